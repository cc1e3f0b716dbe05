"""Configuration, at the bottom of mlmkit: the run's config (`fields`), its checks, parsing and
derived shape, the two user errors, the launch (`launch`), metric names (`keys`) and file helpers.
Nothing here imports torch.

The names most code needs are importable from here (imported on first use):
``from mlmkit.config import MLMConfig, parse_config, ConfigError, micro_batch``.
"""

_LAZY = {"MLMConfig": "fields", "parse_config": "parse", "save_config": "parse",
         "ConfigError": "errors", "DataError": "errors", "micro_batch": "shape",
         "run_shape": "shape", "RunShape": "shape", "validate_config": "validation"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
