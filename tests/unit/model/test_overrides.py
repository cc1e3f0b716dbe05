"""--config_overrides (mlmkit.model.overrides): the parser (nested keys, value types), unknown
keys refused naming close ones, the overrides reaching the model for a scratch config and for
pretrained weights (ModernBERT's global RoPE theta, a longer max_position_embeddings: a second
phase at a longer length), and a learned position table that pretrained weights fix refused."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config_dir, tiny_model
from transformers import AutoConfig

from mlmkit.config.errors import ConfigError
from mlmkit.config.parse import parse_config
from mlmkit.model import checks
from mlmkit.model.loading import load_model, model_config
from mlmkit.model.overrides import apply_overrides, parse_overrides

THETA = "rope_parameters.full_attention.rope_theta"


def test_parse_reads_types_and_nested_keys():
    assert parse_overrides("a=1, b=0.5,c=true,d=False,e=none,f=null,g=gelu_new,h.i.j=2e3") == {
        "a": 1, "b": 0.5, "c": True, "d": False, "e": None, "f": None, "g": "gelu_new",
        "h.i.j": 2000.0}
    assert isinstance(parse_overrides("a=1")["a"], int)
    assert parse_overrides(None) == parse_overrides("") == {}


@pytest.mark.parametrize("text", ["max_position_embeddings", "=3", "a..b=1", "a=1,b"])
def test_parse_refuses_what_is_not_key_value(text):
    with pytest.raises(ConfigError, match="is not key=value. Fix: write comma-separated"):
        parse_overrides(text)


@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory) -> str:
    return tiny_config_dir(tmp_path_factory.mktemp("modernbert"), "modernbert")


def test_nested_keys_change_modernberts_global_rope_theta(modernbert_dir):
    config = AutoConfig.from_pretrained(modernbert_dir)
    assert config.rope_parameters["full_attention"]["rope_theta"] == 160000.0  # transformers 5
    before = config.rope_parameters["sliding_attention"]
    apply_overrides(config, parse_overrides(f"{THETA}=320000,max_position_embeddings=1024"))
    assert config.rope_parameters["full_attention"]["rope_theta"] == 320000.0
    assert isinstance(config.rope_parameters["full_attention"]["rope_theta"], float)  # as held
    assert config.rope_parameters["sliding_attention"] == before  # only the key named
    assert config.max_position_embeddings == 1024


@pytest.mark.parametrize("key, close", [
    ("max_position_embedding", "max_position_embeddings"),
    ("global_rope_theta", THETA),  # ModernBERT's key before transformers 5
    ("rope_parameters.full.rope_theta", THETA),
    ("hidden_size.x", "hidden_size"),
])
def test_an_unknown_key_is_refused_naming_close_keys(modernbert_dir, key, close):
    config = AutoConfig.from_pretrained(modernbert_dir)
    with pytest.raises(ConfigError) as err:
        apply_overrides(config, parse_overrides(f"{key}=1"))
    line = str(err.value)
    assert f"has no key {key!r}" in line and close in line and "Fix:" in line


def _cfg(tokenizer_path, *args):
    return parse_config(["--report_to", "none", "--tokenizer_name", tokenizer_path, *args])


def _rotary_inv_freq(model, layer_type="full_attention"):
    rotary = model.model.rotary_emb
    return getattr(rotary, f"{layer_type}_inv_freq")


def test_overrides_reach_a_scratch_model_and_a_pretrained_one(tmp_path, modernbert_dir,
                                                            tokenizer, tokenizer_path):
    """--config_name: the model is built from the changed config; --model_name_or_path: the
    weights load into it (from_pretrained(config=...)), and a length past the saved
    max_position_embeddings is refused until the override stretches it (rotary positions)."""
    overrides = ["--config_overrides", f"{THETA}=320000,max_position_embeddings=1024"]
    scratch = load_model(_cfg(tokenizer_path, "--config_name", modernbert_dir, *overrides),
                         tokenizer)
    assert scratch.config.rope_parameters["full_attention"]["rope_theta"] == 320000
    # the global layers' rotary frequencies follow the new theta, the local ones keep theirs
    head_dim = scratch.config.hidden_size // scratch.config.num_attention_heads
    expected = 1.0 / 320000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    assert torch.allclose(_rotary_inv_freq(scratch), expected)

    saved = tmp_path / "phase1"
    tiny_model("modernbert").save_pretrained(saved)
    args = ["--model_name_or_path", str(saved), "--max_seq_length", "1024"]
    with pytest.raises(ConfigError, match="takes at most 512 tokens") as err:
        checks.load_tokenizer(_cfg(tokenizer_path, *args))
    assert "--config_overrides max_position_embeddings=1024 (rotary" in str(err.value)
    cfg = _cfg(tokenizer_path, *args, *overrides)
    checks.load_tokenizer(cfg)  # the checks see the stretched config: no error
    pretrained = load_model(cfg, tokenizer)
    assert pretrained.config.max_position_embeddings == 1024
    assert torch.allclose(_rotary_inv_freq(pretrained), expected)
    reference = tiny_model("modernbert")  # the saved weights, loaded into the changed config
    assert torch.equal(pretrained.model.embeddings.tok_embeddings.weight,
                       reference.model.embeddings.tok_embeddings.weight)
    assert model_config(cfg).max_position_embeddings == 1024


def test_a_learned_position_table_cannot_stretch(tmp_path, tiny_bert_dir, tokenizer_path):
    """BERT's positions are a learned table: pretrained weights fix its 512 rows, so stretching it
    is refused in one line; a scratch BERT may be built with any table."""
    saved = tmp_path / "bert"
    tiny_model("bert").save_pretrained(saved)
    stretch = ["--config_overrides", "max_position_embeddings=1024"]
    with pytest.raises(ConfigError) as err:
        checks.check_model_source(_cfg(tokenizer_path, "--model_name_or_path", str(saved),
                                       *stretch))
    line = str(err.value)
    assert "learned absolute positions (bert.embeddings.position_embeddings, 512 rows)" in line
    assert "cannot stretch" in line and "--max_seq_length at most 512" in line
    with pytest.raises(ConfigError, match="its learned position table cannot stretch"):
        checks.load_tokenizer(_cfg(tokenizer_path, "--model_name_or_path", str(saved),
                                   "--max_seq_length", "1024"))
    # from scratch: the refusal names the override, and with it the length fits
    with pytest.raises(ConfigError, match="or --config_overrides max_position_embeddings=1024"):
        checks.load_tokenizer(_cfg(tokenizer_path, "--config_name", tiny_bert_dir,
                                   "--max_seq_length", "1024"))
    checks.load_tokenizer(_cfg(tokenizer_path, "--config_name", tiny_bert_dir,
                               "--max_seq_length", "1024", *stretch))
    # overrides that leave the positions alone are fine on pretrained weights
    checks.check_model_source(_cfg(tokenizer_path, "--model_name_or_path", str(saved),
                                   "--config_overrides", "hidden_dropout_prob=0.0"))


def test_a_scratch_roberta_is_told_the_table_its_offset_needs(tmp_path, tokenizer_path):
    """RoBERTa-style models reserve padding_idx + 1 positions: 200 tokens need a table of 202."""
    roberta = tmp_path / "roberta"
    tiny_model("roberta", pad_token_id=1, max_position_embeddings=130).config.save_pretrained(
        roberta)
    args = ["--config_name", str(roberta), "--max_seq_length", "200"]
    with pytest.raises(ConfigError, match="--config_overrides max_position_embeddings=202"):
        checks.load_tokenizer(_cfg(tokenizer_path, *args))
    checks.load_tokenizer(_cfg(tokenizer_path, *args, "--config_overrides",
                               "max_position_embeddings=202"))
