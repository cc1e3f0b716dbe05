"""mlmkit: masked-language-model fine-tuning on Accelerate and DeepSpeed ZeRO.

The collator always hands the model an attention mask built from example lengths, and the padding
ablation measures what happens when it does not. See README.md and docs/design.md.
"""

__version__ = "0.1.0"
