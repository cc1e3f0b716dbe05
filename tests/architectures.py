"""Prints the per-architecture table of docs/encoders.md: the start-up probe (`mlmkit.model.probe`) on a tiny
model of every architecture in transformers' masked-LM mapping, one markdown row each.

    python tests/architectures.py

tests/unit/model/test_probe.py checks that docs/encoders.md holds exactly these rows.
"""

from __future__ import annotations

from helpers import architecture_row, masked_lm_types, probe_architecture

if __name__ == "__main__":
    from transformers import AutoTokenizer

    from mlmkit.model.checks import embedded_model_path
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    print("| architecture | attention | padded isolated | packed isolated | masked-only head |")
    print("|---|---|---|---|---|")
    for model_type in masked_lm_types():
        _, result = probe_architecture(model_type, tok)
        if result is not None:
            print(architecture_row(model_type, result))
