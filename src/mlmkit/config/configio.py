"""Config plumbing shared by the recipe (`mlmkit.config`), the ablation runner and the report.

* `read_yaml_mapping`: a YAML file that must hold a mapping, with errors that name the file;
* `did_you_mean`: the hint for an unknown key;
* `to_cli_args`: a mapping of flags -> ``--key value`` arguments, in the recipe parser's spelling;
* `config_differences`: which settings differ between two configs, skipping the keys that the
  config's own fields mark as free to differ (``bookkeeping`` in their metadata, see `config.py`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from mlmkit.config.errors import ConfigError


def read_yaml_mapping(path: str | os.PathLike, *, what: str = "--config",
                      example: str = "recipes/configs/default.yaml") -> dict:
    """The mapping in a YAML file (an empty file is an empty mapping); ConfigError otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {path}: no such file. Fix: pass an existing YAML file, "
                          f"e.g. {what} {example}.")
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = " ".join(str(err).split())  # YAML errors span lines: the error stays one line
        raise ConfigError(f"{what} {path}: not readable as YAML ({first}). Fix: correct the "
                          f"file at the place named (see {example} for the form).") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of key: value pairs, found a "
                          f"{type(data).__name__}. Fix: write one `key: value` per line (see "
                          f"{example}).")
    return data


def did_you_mean(key: str, known: Iterable[str], fallback: str, flag: bool = False) -> str:
    """``did you mean 'closest'?`` (``--closest`` for a command-line ``flag``) for a misspelt
    key, else ``fallback``."""
    near = difflib.get_close_matches(str(key), list(known), n=1)
    if not near:
        return fallback
    return f"did you mean --{near[0]}?" if flag else f"did you mean '{near[0]}'?"


def cli_value(value: Any) -> str:
    """One YAML value as the recipe parser spells it (booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_cli_args(flags: dict) -> list[str]:
    """``{key: value}`` -> ``["--key", "value", ...]``; a list gives several values, and ``None``
    or an empty list gives nothing (the lower layer's value, or the default, stays)."""
    args: list[str] = []
    for key, value in flags.items():
        if value is None or (isinstance(value, list) and not value):
            continue
        values = value if isinstance(value, list) else [value]
        args += [f"--{key}", *map(cli_value, values)]
    return args


def _yaml_plain(d: dict) -> dict:
    """``d`` in YAML's types (a tuple becomes a list), as a config file would hold it."""
    return yaml.safe_load(yaml.safe_dump(d)) or {}


def config_differences(saved: dict, current: dict, *, defaults: dict,
                       ignore: Iterable[str] = ()) -> list[str]:
    """``"key: <saved> there, <current> now"`` for each setting that differs, skipping ``ignore``.

    A key missing on one side (a config written by an older mlmkit) counts as its default. Both
    sides are compared in YAML's types (a tuple and a list are equal).
    """
    saved, current, defaults = _yaml_plain(saved), _yaml_plain(current), _yaml_plain(defaults)
    ignore = set(ignore)
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        old, new = saved.get(key, defaults.get(key)), current.get(key, defaults.get(key))
        if old != new:
            diffs.append(f"{key}: {old!r} there, {new!r} now")
    return diffs
