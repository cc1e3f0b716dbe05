"""The README's Python examples of the collator as a library, read from README.md itself.

* :func:`collator_examples`: the ``~~~python`` blocks of the section "MaskedLMCollator as a
  library", joined in order into one script, with only what the README tells CPU users to change
  changed: the ``MODEL = ...`` line, set to the model given.
* :func:`save_tiny_model`: such a model, a 2-layer, 32-wide BERT (`conftest.TINY_BERT`) with
  random weights and the embedded tokenizer, saved as a folder ``from_pretrained`` reads.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## MaskedLMCollator as a library"


def collator_examples(model: str, readme: Path = README) -> str:
    text = readme.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end > 0 else len(text)]
    blocks = re.findall(r"^~~~python\n(.*?)^~~~$", section, flags=re.S | re.M)
    assert len(blocks) >= 2, "the README's collator section lost its Python examples"
    script = "\n".join(blocks)
    # The one change the README allows: "On a CPU, set `MODEL` to a small masked LM".
    assert "**On a CPU**, set `MODEL`" in section
    script, n = re.subn(r"^MODEL = .*$", f"MODEL = {model!r}", script, flags=re.M)
    assert n == 1, f"the README's examples set MODEL {n} times, expected once"
    return script


def save_tiny_model(folder: Path, tokenizer_path: str) -> str:
    """A tiny BertForMaskedLM and the tokenizer at ``tokenizer_path``, saved in ``folder``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from conftest import TINY_BERT

    config = BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"})
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
    return str(folder)
