"""downstream.py on the tiny BERT in this process: the probe's accuracy tells a separable set from
shuffled labels, a masked embedding ignores its batch's padding (an unmasked one does not), the
pseudo-perplexity is the hand-computed one, and `Downstream` logs the metrics each
--probe_mask_padding asks for. (A run that logs them at every eval: tests/unit/test_recipe.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import SENTENCES, isolated_globals, tiny_model

from mlmkit.config.fields import MLMConfig
from mlmkit.data.corpus import IndexedExamples, text_examples
from mlmkit.data.probe_file import ProbeSet
from mlmkit.model.loading import MaskedLMModule
from mlmkit.train import tracking as M
from mlmkit.train.downstream import (
    Downstream,
    embed,
    probe_accuracy,
    pseudo_perplexity,
)
from mlmkit.train.evaluation import eval_collator


@pytest.fixture
def accelerator():
    with isolated_globals():
        from accelerate import Accelerator
        yield Accelerator(cpu=True)


@pytest.fixture(scope="module")
def module():
    return MaskedLMModule(tiny_model("bert"))


def examples_of(texts, tokenizer, max_length=128) -> IndexedExamples:
    columns = text_examples(texts, tokenizer, max_length=max_length, line_by_line=True)
    return IndexedExamples(Dataset.from_dict(columns))


def test_probe_accuracy_is_high_on_a_separable_set_and_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 60)
    centres = rng.normal(size=(3, 16)) * 3
    features = centres[np.searchsorted(["a", "b", "c"], labels)] + rng.normal(size=(180, 16))
    mean, std = probe_accuracy(features, labels, folds=5)
    assert mean > 0.95 and 0 <= std < 0.05
    shuffled = rng.permutation(labels)
    mean, _ = probe_accuracy(features, shuffled, folds=5)
    assert abs(mean - 1 / 3) < 0.12  # chance, for 3 balanced labels
    assert probe_accuracy(features, shuffled, folds=5) == (mean, _)  # fixed folds: reproducible


def test_a_masked_embedding_ignores_the_padding_of_its_batch(accelerator, module, tokenizer):
    cfg = MLMConfig()
    collator = eval_collator(tokenizer, cfg)
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES[:4]] + [tokenizer(" ".join(SENTENCES))
                                                                ["input_ids"]]
    alone = embed(accelerator, module, ids, collator.layout, batch_size=1)  # no padding
    together = embed(accelerator, module, ids, collator.layout, batch_size=len(ids))
    assert alone.shape == (len(ids), 32)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # the same batch without the mask: the short texts' embeddings take in the padding
    unmasked = embed(accelerator, module, ids, collator.layout, batch_size=len(ids),
                     mask_padding=False)
    assert (unmasked[:4] - alone[:4]).abs().max() > 1e-2
    torch.testing.assert_close(unmasked[4], alone[4], atol=1e-5, rtol=1e-5)  # the longest: none
    # the order into batches does not move a masked embedding
    torch.testing.assert_close(embed(accelerator, module, ids, collator.layout, batch_size=2,
                                     order=[4, 2, 0, 1, 3]), alone, atol=1e-5, rtol=1e-5)
    # the mean over the real tokens, special tokens included: by hand for the first text
    hidden = module.model.base_model(input_ids=torch.tensor([ids[0]])).last_hidden_state[0]
    torch.testing.assert_close(alone[0], hidden.mean(0), atol=1e-5, rtol=1e-5)


def hand_pseudo_perplexity(model, examples) -> float:
    """Salazar et al.'s PLL, one forward per token: each real non-special token masked alone."""
    log_probs = []
    for item in examples:
        ids = torch.tensor(item["input_ids"])
        for pos, special in enumerate(item["special_tokens_mask"]):
            if special:
                continue
            masked = ids.clone()
            masked[pos] = 103  # [MASK]
            logits = model(input_ids=masked[None]).logits[0, pos]
            log_probs.append(torch.log_softmax(logits.double(), -1)[ids[pos]].item())
    return math.exp(-sum(log_probs) / len(log_probs))


def test_pseudo_perplexity_is_the_hand_computed_one(accelerator, module, tokenizer):
    examples = examples_of(["A short one.", SENTENCES[1]], tokenizer)
    collator = eval_collator(tokenizer, MLMConfig())
    expected = hand_pseudo_perplexity(module.model, examples.fetch([0]))
    # one short example: 4 tokens masked in turn, in batches of 3 (a batch of 3 and one of 1)
    got = pseudo_perplexity(accelerator, module, examples, collator, n=1, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)
    assert 1 < got < 1e6
    # two examples of different lengths: padded copies, the mean over all their tokens
    expected = hand_pseudo_perplexity(module.model, examples.fetch([0, 1]))
    got = pseudo_perplexity(accelerator, module, examples, collator, n=5, batch_size=4)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("arms, keys", [
    ("true", [M.EVAL_PROBE_ACCURACY, M.EVAL_PROBE_ACCURACY_STD]),
    ("false", [M.EVAL_PROBE_ACCURACY_UNMASKED, M.EVAL_PROBE_ACCURACY_UNMASKED_STD]),
    ("both", [M.EVAL_PROBE_ACCURACY, M.EVAL_PROBE_ACCURACY_STD, M.EVAL_PROBE_ACCURACY_UNMASKED,
              M.EVAL_PROBE_ACCURACY_UNMASKED_STD, M.EVAL_PSEUDO_PERPLEXITY]),
])
def test_downstream_logs_what_the_flags_ask_for(accelerator, module, tokenizer, arms, keys):
    texts = [f"{s} {w}" for s in SENTENCES[:4] for w in ("cats", "dogs", "birds")]
    probe = ProbeSet("p.tsv", texts, [t.split()[-1] for t in texts])
    cfg = MLMConfig(probe_file=["p.tsv"], probe_folds=2, probe_mask_padding=arms,
                    pseudo_perplexity_examples=2 if arms == "both" else 0)
    module.train()
    metrics = Downstream(accelerator, module, eval_collator(tokenizer, cfg), cfg, [probe],
                         examples_of(SENTENCES, tokenizer))()
    assert sorted(metrics) == sorted(keys)
    assert module.training  # left as it was found
    for key in keys:
        if "probe_accuracy" in key and not key.endswith("_std"):
            assert 0 <= metrics[key] <= 1
    assert Downstream(accelerator, module, eval_collator(tokenizer, MLMConfig()),
                      MLMConfig())() == {}  # neither asked for: nothing runs


def test_several_probes_are_named_by_their_files_stems(accelerator, module, tokenizer):
    """--probe_file A B: one probe each, its metrics `<key>/<stem>`; the first probe's numbers are
    the ones it gets alone (the unsuffixed names of a single file)."""
    texts = [f"{s} {w}" for s in SENTENCES[:4] for w in ("cats", "dogs", "birds")]
    animals = ProbeSet("probes/animals.tsv", texts, [t.split()[-1] for t in texts])
    lengths = ProbeSet("other/lengths.csv", texts, [str(len(t) % 2) for t in texts])
    cfg = MLMConfig(probe_file=["a", "b"], probe_folds=2, probe_mask_padding="both")
    collator = eval_collator(tokenizer, cfg)
    metrics = Downstream(accelerator, module, collator, cfg, [animals, lengths])()
    assert sorted(metrics) == sorted(
        M.probe_key(key, name) for name in ("animals", "lengths")
        for key in (M.EVAL_PROBE_ACCURACY, M.EVAL_PROBE_ACCURACY_STD,
                    M.EVAL_PROBE_ACCURACY_UNMASKED, M.EVAL_PROBE_ACCURACY_UNMASKED_STD))
    assert M.probe_key(M.EVAL_PROBE_ACCURACY, "animals") == "eval/probe_accuracy/animals"
    alone = Downstream(accelerator, module, collator, cfg, [animals])()
    for key in (M.EVAL_PROBE_ACCURACY, M.EVAL_PROBE_ACCURACY_UNMASKED):
        assert metrics[M.probe_key(key, "animals")] == pytest.approx(alone[key])
