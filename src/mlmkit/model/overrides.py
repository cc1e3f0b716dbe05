"""``--config_overrides key=value,...``: changes to the model's config before it is built.

As in transformers' ``run_mlm.py``, but for every model source (``--config_name``,
``--model_name_or_path`` and the embedded default) and with nested keys written with dots, e.g.
``rope_parameters.full_attention.rope_theta=160000`` (ModernBERT keeps its global RoPE theta
there in transformers 5). Values are read as int, float, bool (``true``/``false``), None
(``none``/``null``) or else a string. A key the config does not have is refused, naming the
closest keys it does have.

`parse_overrides` reads the text; `apply_overrides` sets the values on a config (a
``PretrainedConfig``), in place. `checks.check_model_source` applies them before the model is
built on the meta device (so every check sees the changed model), `loading.load_model` before the
real one is loaded (``from_pretrained(..., config=...)``).
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from torch import nn

from mlmkit.config.errors import ConfigError

FLAG = "config_overrides"


def _value(text: str) -> Any:
    """``text`` as an int, float, bool or None where it reads as one, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            pass
    return text.strip()


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"a=1,b.c=x"`` -> ``{"a": 1, "b.c": "x"}``; a ConfigError for an item that is not
    ``key=value``."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{FLAG}={text!r}: {item.strip()!r} is not key=value. Fix: write "
                              "comma-separated key=value pairs, nested keys with dots, e.g. "
                              "--config_overrides max_position_embeddings=8192,"
                              "rope_parameters.full_attention.rope_theta=160000.")
        out[key] = _value(value)
    return out


def _keys(node: Any) -> list[str]:
    """The keys of a config (its to_dict) or of a dict."""
    if isinstance(node, dict):
        return list(node)
    return list(node.to_dict()) if hasattr(node, "to_dict") else []


def _flat(node: Any, prefix: str = "") -> list[str]:
    """Every key of ``node``, nested ones as dotted paths."""
    out = []
    for key in _keys(node):
        path = f"{prefix}{key}"
        out.append(path)
        child = node[key] if isinstance(node, dict) else getattr(node, key, None)
        if isinstance(child, dict) or hasattr(child, "to_dict"):
            out.extend(_flat(child, path + "."))
    return out


def close_keys(config, key: str, n: int = 3) -> list[str]:
    """The config's keys (dotted paths) most like ``key``: by spelling, and those whose last part
    contains the last part of ``key`` or is contained in it."""
    keys = _flat(config)
    last = key.rsplit(".", 1)[-1].lower()
    near = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
    near += [k for k in keys if k not in near and (
        (tail := k.rsplit(".", 1)[-1].lower()) in last or last in tail) and len(tail) > 3]
    return near[:n]


def _unknown(config, key: str) -> ConfigError:
    near = close_keys(config, key)
    hint = f"close keys: {', '.join(near)}" if near else "its keys are in the model's config.json"
    return ConfigError(f"{FLAG}: the {getattr(config, 'model_type', 'model')} config has no key "
                       f"{key!r} ({hint}). Fix: use a key of the config (nested keys with dots), "
                       "or drop it.")


def _like(old: Any, value: Any) -> Any:
    """``value`` as a float where the config holds a float and it reads as an int (160000 for a
    RoPE theta of 10000.0)."""
    return float(value) if isinstance(old, float) and type(value) is int else value


def apply_overrides(config, overrides: dict[str, Any]):
    """Set ``overrides`` (from `parse_overrides`) on ``config`` in place and return it; a
    ConfigError names an unknown key and the closest known ones."""
    for key, value in overrides.items():
        parts = key.split(".")
        head = parts[0]
        if head not in _keys(config):
            raise _unknown(config, key)
        if len(parts) == 1:
            setattr(config, head, _like(getattr(config, head, None), value))
            continue
        root = copy.deepcopy(getattr(config, head))
        node = root
        for i, part in enumerate(parts[1:], start=1):
            if isinstance(node, dict) and part in node:
                if i == len(parts) - 1:
                    node[part] = _like(node[part], value)
                else:
                    node = node[part]
            elif hasattr(node, "to_dict") and part in _keys(node):
                if i == len(parts) - 1:
                    setattr(node, part, _like(getattr(node, part, None), value))
                else:
                    node = getattr(node, part)
            else:
                raise _unknown(config, key)
        setattr(config, head, root)
    return config


def learned_position_table(meta: nn.Module, config) -> str | None:
    """The name of ``meta``'s learned absolute position table (an embedding of
    ``max_position_embeddings`` rows named like positions), or None (rotary or relative
    positions)."""
    rows = getattr(config, "max_position_embeddings", None)
    for name, module in meta.named_modules():
        if isinstance(module, nn.Embedding) and "position" in name.lower() and \
                module.num_embeddings == rows:
            return name
    return None


def check_stretch(meta: nn.Module, config, overrides: dict, rows: int | None, where: str,
                  offset: int = 0) -> None:
    """Pretrained weights: an override of ``max_position_embeddings`` (``rows`` before it) is
    refused where the positions are a learned table (``meta``: the model built with the
    overrides), which the weights fix; rotary positions stretch."""
    new = overrides.get("max_position_embeddings", rows)
    table = learned_position_table(meta, config)
    if new != rows and table:
        raise ConfigError(
            f"{FLAG}: max_position_embeddings={new}: {where} has learned absolute positions "
            f"({table}, {rows} rows) that its weights fix, so they cannot stretch. Fix: drop the "
            f"override and keep --max_seq_length at most {rows - offset}, or continue a model "
            "with rotary positions (ModernBERT, NeoBERT, ...).")
