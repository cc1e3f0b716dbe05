"""mlmkit.train.fill_mask on a tiny BERT saved to disk: the same top-k as transformers'
pipeline("fill-mask"), the answer's rank, the deterministic choice of held-out probes, the CLI."""

from __future__ import annotations

import json
import types

import pytest
import torch
from helpers import tiny_model

from mlmkit.train import fill_mask as F


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny BERT with random weights, saved with the embedded tokenizer like model/."""
    path = tmp_path_factory.mktemp("fill_mask_model")
    tiny_model("bert", len(tokenizer), tokenizer.pad_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def validation(tokenizer):
    from mlmkit.config.fields import MLMConfig
    from mlmkit.data.corpus import IndexedExamples, load_raw_datasets, tokenize_datasets

    cfg = MLMConfig(padding="longest", max_eval_samples=64)
    return IndexedExamples(tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)["validation"])


def test_top_k_is_what_the_fill_mask_pipeline_returns(model_dir):
    from transformers import pipeline

    pipe = pipeline("fill-mask", model=str(model_dir), tokenizer=str(model_dir), device="cpu")
    model, tokenizer = F.load(model_dir)
    for text in ("the [MASK] statement raises an exception.", "a [MASK] program is run."):
        expected = [r["token_str"].strip() for r in pipe(text, top_k=5)]
        assert F.fill(model, tokenizer, text)["top"] == expected


def test_rank_of_the_answer(model_dir):
    model, tokenizer = F.load(model_dir)
    text = "a [MASK] program is constructed from code blocks."
    python = tokenizer.convert_tokens_to_ids("python")
    bias = model.cls.predictions.decoder.bias  # (V,), not tied: steer one word's logit
    with torch.no_grad():
        bias[python] = 100.0
    result = F.fill(model, tokenizer, text, answer="python")
    assert result["rank"] == 1 and result["top"][0] == "python"
    with torch.no_grad():
        bias[python] = -100.0
    assert F.fill(model, tokenizer, text, answer="python")["rank"] == len(bias)  # the last
    assert F.fill(model, tokenizer, text, answer="pythonesque")["rank"] is None  # split word
    with pytest.raises(ValueError, match="exactly one"):
        F.fill(model, tokenizer, "no mask here")


def test_probes_are_held_out_sentences_with_one_word_masked(tokenizer, validation):
    probes = F.choose_probes(tokenizer, validation)
    assert len(probes) == F.FILL_MASK_PROBES
    assert F.choose_probes(tokenizer, validation) == probes  # deterministic
    assert len({p["answer"] for p in probes}) == len(probes)
    texts = [tokenizer.decode(item["input_ids"], skip_special_tokens=True)
             for item in validation.fetch(range(len(validation)))]
    for probe in probes:
        assert probe["text"].count(tokenizer.mask_token) == 1
        answer = probe["answer"]
        assert answer.isalpha() and len(answer) >= F.MIN_WORD_LETTERS
        assert len(tokenizer.tokenize(answer)) == 1  # one token: the model can name it
        sentence = probe["text"].replace(tokenizer.mask_token, answer)
        assert any(sentence in t for t in texts)  # from the validation split
        assert not sentence.startswith(answer)


def test_combine_and_log_lines():
    probes = [{"text": "a [MASK] b.", "answer": "word"}]
    after = [{"top": ["word", "x", "y", "z", "w"], "rank": 1}]
    entries = F.combine(probes, [{"top": ["q"] * 5, "rank": 900}], after)
    assert entries == [{"text": "a [MASK] b.", "answer": "word", "before": ["q"] * 5,
                        "after": after[0]["top"], "rank_before": 900, "rank_after": 1}]
    assert json.loads(json.dumps(entries)) == entries  # summary.json-ready
    assert F.combine(probes, [], after)[0]["rank_before"] is None  # e.g. an older checkpoint
    lines = F.format_lines(entries)
    assert "[word: rank 900 -> 1]" in lines[1] and lines[-1].strip() == "after:  word, x, y, z, w"


def test_literal_mask_is_the_tokenizers_own():
    roberta_like = types.SimpleNamespace(mask_token="<mask>")
    assert F.with_mask_token("a [MASK] b", roberta_like) == "a <mask> b"


def test_cli_prints_top_5(model_dir, capsys):
    assert F.main([str(model_dir), "the [MASK] is empty.", "--top_k", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "the [MASK] is empty."
    assert [line.split(".")[0].strip() for line in out[1:]] == ["1", "2", "3", "4", "5"]
    assert F.main([str(model_dir), "no mask"]) == 2
    assert "exactly one [MASK]" in capsys.readouterr().err
    assert F.main(["/no/such/model", "a [MASK]."]) == 2


def test_loads_plainly_inside_a_zero3_run(model_dir):
    """Under ZeRO-3 transformers would build the model partitioned (a collective that the other
    processes never join: the main process hung); the check loads it as in a fresh process and
    leaves the run's DeepSpeed config in place."""
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
    )

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})
    assert is_deepspeed_zero3_enabled()
    model, _ = F.load(model_dir)
    assert is_deepspeed_zero3_enabled()  # restored
    assert not any(hasattr(p, "ds_id") for p in model.parameters())  # whole tensors
    assert model.bert.embeddings.word_embeddings.weight.shape == (30522, 32)
    del config
