"""evaluation.py: eval masks at --eval_mlm_probability, whatever the training rate. (The eval
loss itself -- padded, packed, masked-only head -- is compared in test_layout.py; the recipe's
eval against a re-evaluation of model/ in tests/integration/test_distributed.py.)"""

from __future__ import annotations

from mlmkit.batch.collator import MaskedLMCollator
from mlmkit.config.validation import validate_config


def test_eval_masking_rate_is_independent_of_training(tokenizer):
    from mlmkit.config.fields import MLMConfig
    from mlmkit.train.evaluation import eval_collator

    cfg = validate_config(MLMConfig(mlm_probability=0.3))
    train = MaskedLMCollator.from_config(tokenizer, cfg, position_offset=0, padding="longest")
    assert train.masker.mlm_probability == 0.3
    assert eval_collator(tokenizer, cfg).masker.mlm_probability == 0.15  # the default
    cfg = validate_config(MLMConfig(mlm_probability=0.3, eval_mlm_probability=0.2))
    assert eval_collator(tokenizer, cfg).masker.mlm_probability == 0.2
