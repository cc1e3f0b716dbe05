"""mlmkit: masked-language-model fine-tuning on Accelerate and DeepSpeed ZeRO.

The collator always hands the model an attention mask built from example lengths, and the padding
ablation measures what happens when it does not. See README.md and docs/design.md.

``from mlmkit import MaskedLMCollator`` is the collator as a library (a drop-in for transformers'
``DataCollatorForLanguageModeling``). It is imported on first use, so that ``import mlmkit.config``
and the other light modules do not pull in torch.
"""

__version__ = "0.1.0"

# Public name -> the module that defines it, imported lazily by `__getattr__`.
_LAZY = {"MaskedLMCollator": "mlmkit.batch.collator"}

__all__ = ["MaskedLMCollator", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'mlmkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
