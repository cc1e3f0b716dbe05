"""`parse_config`: a YAML file (``--config``) then ``--key value`` overrides, through
transformers' ``HfArgumentParser`` (the same typed parsing for both), validated; `save_config`
writes the resolved config."""

from __future__ import annotations

import copy
import dataclasses
import os
import re

from transformers import HfArgumentParser

from mlmkit.config.configio import did_you_mean, read_yaml_mapping, to_cli_args
from mlmkit.config.errors import ConfigError
from mlmkit.config.fields import _OWN_METADATA, FIELDS, MLMConfig
from mlmkit.config.fileio import atomic_write_text
from mlmkit.config.validation import validate_config


class _Parser(HfArgumentParser):
    """HfArgumentParser that raises ConfigError instead of printing usage and exiting, and keeps
    mlmkit's own field metadata (bookkeeping, per_run) away from argparse."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        field = copy.copy(field)
        field.metadata = {k: v for k, v in field.metadata.items() if k not in _OWN_METADATA}
        HfArgumentParser._parse_dataclass_field(parser, field)

    def error(self, message: str):  # noqa: D401 - argparse hook
        raise ConfigError(f"{message.rstrip('.')}. Fix: {_argparse_fix(message)}.")


def _argparse_fix(message: str) -> str:
    """The fix for one of argparse's messages (a value of the wrong type, a missing value)."""
    match = re.match(r"argument (--\w+)", message)
    flag = match.group(1) if match else "the flag"
    if "expected one argument" in message or "expected at least one argument" in message:
        return f"give {flag} a value ({flag} VALUE; `python recipes/mlm.py --help` lists them)"
    if "invalid int value" in message:
        return f"pass a whole number to {flag}"
    if "invalid float value" in message:
        return f"pass a number to {flag} (e.g. 1e-4 or 0.15)"
    if "Truthy value expected" in message:
        return f"pass true or false to {flag}"
    return "see `python recipes/mlm.py --help` for the flags and their values"


def _parse_args(args: list[str]) -> MLMConfig:
    """``--key value`` arguments -> an MLMConfig, not yet validated. A word left over (a stray
    value, often a glob the shell expanded) is a ConfigError, not HfArgumentParser's ValueError."""
    cfg, leftover = _Parser(MLMConfig).parse_args_into_dataclasses(
        args=args, return_remaining_strings=True)
    flags = [arg for arg in leftover if re.match(r"--?[A-Za-z]", arg)]
    if flags:  # e.g. a single-dash -flag (its value is left over too)
        raise _unknown_option(flags[0])
    if leftover:
        raise ConfigError(
            f"unexpected argument(s) {', '.join(map(repr, leftover))} (not a --flag; a flag that "
            "takes one value was given several, often a glob the shell expanded). Fix: quote "
            "globs so the shell does not expand them (--train_file 'data/*.parquet'), or remove "
            "the stray words.")
    return cfg


def _unknown_option(flag: str) -> ConfigError:
    """The error for a command-line option that is not a recipe flag, with the nearest flag."""
    hint = did_you_mean(flag.lstrip("-"), FIELDS, "see --help", flag=True)
    return ConfigError(f"unknown option {flag}. Fix: remove it ({hint}).")


def unknown_key_error(key: str, where: str) -> ConfigError:
    """The error for a YAML key that is not a recipe flag, with the nearest flag as a hint."""
    hint = did_you_mean(key, FIELDS, "see `recipes/mlm.py --help`")
    return ConfigError(f"{where}: unknown key '{key}'. Fix: remove it or rename it ({hint}). "
                       "Launch settings (processes, ZeRO stage, mixed precision) belong in "
                       "accelerate_configs/, not in recipe YAMLs.")


def yaml_args(path: str) -> list[str]:
    """A recipe YAML as command-line arguments, each key checked and type-checked (errors name
    the file)."""
    data = read_yaml_mapping(path)
    for key in data:
        if key not in FIELDS:
            raise unknown_key_error(str(key), path)
    args = to_cli_args(data)
    try:  # type-check the file on its own so the error names the file
        _parse_args(args)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return args


def parse_config(argv: list[str] | None = None) -> MLMConfig:
    """Parse ``[--config FILE] [--key value ...]`` into a validated MLMConfig.

    Precedence: dataclass defaults < YAML file < command line.
    """
    argv = list(argv or [])
    from_yaml: list[str] = []
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise ConfigError("--config needs a path. Fix: --config recipes/configs/default.yaml.")
        from_yaml = yaml_args(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    cli = _keys(argv)
    for key in cli:
        if key not in FIELDS and key != "help":
            raise _unknown_option(f"--{key}")
    cfg = _parse_args(from_yaml + argv)
    return validate_config(_one_micro_batch(cfg, yaml=set(_keys(from_yaml)), cli=set(cli)))


_MICRO_KEYS = ("per_device_train_batch_size", "per_device_train_tokens")


def _keys(args: list[str]) -> list[str]:
    """The option names of ``args`` (``--key value`` or ``--key=value``), in order."""
    return [arg[2:].split("=")[0] for arg in args if arg.startswith("--")]


def _one_micro_batch(cfg: MLMConfig, *, yaml: set[str], cli: set[str]) -> MLMConfig:
    """The micro-batch stated once: both sizes at one level (the YAML, or the command line) is a
    ConfigError; a batch size on the command line overrides the YAML's token budget (the
    command line wins, as for every key)."""
    for where, keys in (("the command line", cli), ("the --config file", yaml)):
        if all(k in keys for k in _MICRO_KEYS):
            raise ConfigError(
                f"per_device_train_tokens and per_device_train_batch_size both given on {where}: "
                "the micro-batch is stated once. Fix: keep --per_device_train_tokens (tokens per "
                "device) or --per_device_train_batch_size (examples), not both.")
    if "per_device_train_batch_size" in cli and "per_device_train_tokens" in yaml:
        cfg = dataclasses.replace(cfg, per_device_train_tokens=None)
    return cfg


def save_config(cfg: MLMConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    import yaml
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
