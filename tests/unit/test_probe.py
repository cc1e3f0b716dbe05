"""probe.py on every architecture in transformers' masked-LM mapping, built tiny: the start-up
probe's verdict is honoured (a mode that is not isolated is refused with a ConfigError, never a
raw exception from inside the model), and the README's per-architecture table is what the probe
measures (`python tests/architectures.py` prints it). The masked-only head of each layout is
tested in tests/unit/test_modeling.py."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from helpers import architecture_row, masked_lm_types, probe_architecture
from mlmkit.config import ConfigError
from mlmkit.probe import resolve_padding

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@functools.lru_cache(maxsize=None)
def probed(model_type: str, tokenizer):
    return probe_architecture(model_type, tokenizer)


@pytest.mark.sweep
@pytest.mark.parametrize("model_type", masked_lm_types())
def test_probe_verdict_is_enforced_and_in_the_readme(model_type, tokenizer):
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
    assert architecture_row(model_type, result) in README, "README's architecture table is stale: run " \
        "`python tests/architectures.py` and paste its rows"
