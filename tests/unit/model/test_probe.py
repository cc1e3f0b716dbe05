"""probe.py on every architecture in transformers' masked-LM mapping, built tiny: the start-up
probe's verdict is honoured (a mode that is not isolated is refused with a ConfigError, never a
raw exception from inside the model), and the per-architecture table of docs/encoders.md is what the probe
measures (`python tests/architectures.py` prints it). The masked-only head of each layout is
tested in tests/unit/model/test_modeling.py."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from helpers import architecture_row, masked_lm_types, probe_architecture

from mlmkit.config.errors import ConfigError
from mlmkit.model.probe import resolve_padding

ENCODERS_PAGE = (Path(__file__).resolve().parents[3] / "docs" / "encoders.md").read_text()


@functools.lru_cache(maxsize=None)
def probed(model_type: str, tokenizer):
    return probe_architecture(model_type, tokenizer)


@pytest.mark.sweep
@pytest.mark.parametrize("model_type", masked_lm_types())
def test_probe_verdict_is_enforced_and_in_the_docs(model_type, tokenizer):
    model, result = probed(model_type, tokenizer)
    if model is None:
        pytest.skip(f"{model_type} cannot be built tiny from its config alone")
    assert result.architecture == type(model).__name__
    # packed: trained only where proven; otherwise a one-line ConfigError naming the model
    if result.packed_isolated:
        assert resolve_padding("packed", result, accept_padding_leak=True)[0] == "packed"
    else:
        with pytest.raises(ConfigError, match=f"not isolated on {result.architecture}") as err:
            resolve_padding("packed", result, accept_padding_leak=True)
        assert "\n" not in str(err.value) and "Fix:" in str(err.value)
    # padded: refused where padding leaks through the mask, unless the user accepts it
    if result.padded_isolated:
        assert resolve_padding("longest", result)[0] == "longest"
    else:
        with pytest.raises(ConfigError, match="not isolated from padding"):
            resolve_padding("longest", result)
        if result.padded_error is None:
            assert "WARNING" in resolve_padding("longest", result, accept_padding_leak=True)[1]
    # auto: packed exactly where packing is proven
    if result.padded_isolated or result.packed_isolated:
        chosen, why = resolve_padding("auto", result)
        assert chosen == ("packed" if result.packed_isolated else "longest"), why
    assert architecture_row(model_type, result) in ENCODERS_PAGE, "docs/encoders.md's architecture " \
        "table is stale: run `python tests/architectures.py` and paste its rows"


# The architectures mlmkit packs through a path of its own (modeling.use_packed_path).
OWN_PACKED_PATH = ("deberta", "deberta-v2", "esm", "flaubert", "layoutlm", "longformer",
                   "modernbert", "xlm", "xmod")


@pytest.mark.parametrize("model_type", OWN_PACKED_PATH)
def test_own_packed_paths_are_proven_isolated(model_type, tokenizer):
    """The probe, on the path training takes, finds packed and padded batches isolated and the
    masked-only head equal to the full head."""
    _, result = probed(model_type, tokenizer)
    assert result.packed_isolated and result.padded_isolated, result
    assert result.packed_leak <= result.tolerance and result.sparse_head
    assert resolve_padding("auto", result)[0] == "packed"


def test_modernbert_needs_the_window_within_the_example(tokenizer):
    """Under SDPA with the collator's plain block mask, ModernBERT's local layers see the whole
    long probe example (past their window): the probe refuses it. mlmkit's attention function
    windows within the example: isolated."""
    from helpers import tiny_model

    from mlmkit.model.checks import position_offset
    from mlmkit.model.loading import attn_implementation
    from mlmkit.model.packed import use_packed_path
    from mlmkit.model.probe import probe_isolation
    model = tiny_model("modernbert", len(tokenizer), tokenizer.pad_token_id,
                       attn_implementation="sdpa")
    results = []
    for switch in (False, True):
        if switch:
            assert use_packed_path(model) == "attention"
        results.append(probe_isolation(model, tokenizer, attn_implementation=attn_implementation(model),
                                       position_offset=position_offset(model), max_length=128))
    plain, own = results
    assert plain.attn_implementation == "sdpa" and not plain.packed_isolated
    assert own.attn_implementation == "mlmkit_packed" and own.packed_isolated
