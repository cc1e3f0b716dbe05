"""The fill-mask check: what a model predicts for one masked word, before and after training.

    python -m mlmkit.train.fill_mask outputs/demo/model "The [MASK] statement raises an exception."

The CLI prints the top-5 fillers for each text, run on the model folder on CPU: what
``transformers.pipeline("fill-mask")`` returns (`fill` computes the same softmax, top-k and
decoding without the pipeline machinery, whose import alone takes seconds; the unit test checks
the two agree). ``[MASK]`` in the text is replaced by the tokenizer's own mask token (``<mask>``
for RoBERTa-style tokenizers), so either spelling works.

In the recipe (``--fill_mask_check``, on by default) a few fixed held-out sentences are chosen from
the validation split (`choose_probes`), one word masked in each; the initial model and the
exported ``model/`` each fill them (`initial_predictions`, `predict`), and the top-5 and the rank
of the masked word are written to ``summary.json`` (``fill_mask``) and the log. Both models are
read from disk on the main process, on CPU: the same HF export path whatever the engine (DDP,
ZeRO-3, FSDP2), and what a user of ``model/`` would get. Nothing here draws from the run's random
number generators, so the check never changes the training.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from mlmkit.model.checks import outside_zero3
from mlmkit.model.loading import export_hf_model

FILL_MASK_PROBES = 3      # sentences per run
TOP_K = 5
MIN_WORD_LETTERS = 5      # masked words: letters only, at least this long (content words)
SENTENCE_WORDS = (8, 24)  # probe sentences: this many words, inclusive
SCAN_EXAMPLES = 2000      # validation examples read to choose them (the first ones)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CODE_CHARS = set("()[]{}<>=_*`'\"\\/|#@$%^~:;")


def _letters(word: str) -> str:
    return word.rstrip(".,")


def _single_token_id(tokenizer, word: str) -> int | None:
    """The id of ``word`` as one token after a space (how it reads inside a sentence), or None
    when the tokenizer splits it."""
    pieces = tokenizer.tokenize(" " + word)
    if len(pieces) != 1:
        return None
    token_id = tokenizer.convert_tokens_to_ids(pieces[0])
    return None if token_id == tokenizer.unk_token_id else int(token_id)


def choose_probes(tokenizer, examples, n: int = FILL_MASK_PROBES) -> list[dict[str, str]]:
    """``n`` held-out sentences with one word masked, chosen deterministically from ``examples``
    (a tokenized validation split, `data.IndexedExamples`; its first 2,000 examples).

    Each example is decoded, and its first sentence of 8-24 words that reads as prose (no code
    characters, ends with a full stop) is taken; in it, the word to mask is the one, among the
    words of at least 5 letters that the tokenizer keeps whole (one token) -- the first word of
    the sentence excepted -- whose token is most frequent in those examples (ties: the first), and
    not already masked in an earlier probe. Returns ``[{"text": ..., "answer": ...}]`` with
    ``text`` holding the tokenizer's mask token; fewer than ``n`` if the split has fewer.
    """
    counts: Counter[int] = Counter()
    items = examples.fetch(range(min(len(examples), SCAN_EXAMPLES)))
    for item in items:
        counts.update(item["input_ids"])
    probes: list[dict[str, str]] = []
    used: set[str] = set()
    for item in items:
        text = tokenizer.decode(item["input_ids"], skip_special_tokens=True)
        for sentence in _SENTENCE_END.split(text.strip()):
            words = sentence.split()
            if not (SENTENCE_WORDS[0] <= len(words) <= SENTENCE_WORDS[1]) or \
                    not sentence.endswith(".") or _CODE_CHARS & set(sentence):
                continue
            best = None
            for pos, word in enumerate(words[1:], start=1):
                bare = _letters(word)
                if len(bare) < MIN_WORD_LETTERS or not bare.isalpha() or bare.lower() in used:
                    continue
                token_id = _single_token_id(tokenizer, bare)
                if token_id is not None and (best is None or counts[token_id] > best[0]):
                    best = (counts[token_id], pos, bare)
            if best is None:
                continue
            _, pos, bare = best
            masked = words[:pos] + [words[pos].replace(bare, tokenizer.mask_token, 1)] + words[pos + 1:]
            probes.append({"text": " ".join(masked), "answer": bare})
            used.add(bare.lower())
            break  # one sentence per example: probes from different paragraphs
        if len(probes) == n:
            break
    return probes


def load(model_dir: str | Path):
    """(model, tokenizer) from a saved model folder, on CPU, in fp32, in eval mode, whatever
    engine the calling process runs."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging


    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the run's log
    try:
        with outside_zero3():
            model = AutoModelForMaskedLM.from_pretrained(str(model_dir), dtype=torch.float32)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval(), AutoTokenizer.from_pretrained(str(model_dir))


def with_mask_token(text: str, tokenizer) -> str:
    """``text`` with a literal ``[MASK]`` replaced by the tokenizer's own mask token."""
    return text.replace("[MASK]", tokenizer.mask_token) if tokenizer.mask_token != "[MASK]" else text


def fill(model, tokenizer, text: str, answer: str | None = None,
         k: int = TOP_K) -> dict[str, Any]:
    """Top-``k`` fillers of the one mask in ``text``, as ``pipeline("fill-mask")`` gives them
    (its ``token_str``: each id decoded alone), and the rank of ``answer`` among the whole
    vocabulary (1 = the model's first choice; None without an answer or for a split word)."""
    import torch

    text = with_mask_token(text, tokenizer)
    enc = tokenizer(text, return_tensors="pt")
    at = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten()
    if len(at) != 1:
        also = " (or [MASK])" if tokenizer.mask_token != "[MASK]" else ""
        raise ValueError(f"{text!r} must hold exactly one {tokenizer.mask_token}{also}.")
    with torch.no_grad():
        logits = model(**enc).logits[0, at[0]].float()  # (V,)
    top = [tokenizer.decode([int(i)]).strip() for i in logits.topk(k).indices]
    answer_id = _single_token_id(tokenizer, answer) if answer is not None else None
    rank = None if answer_id is None else int((logits > logits[answer_id]).sum()) + 1
    return {"top": top, "rank": rank}


def predict(model_dir: str | Path, probes: list[dict[str, str]], k: int = TOP_K) -> list[dict]:
    """`fill` for every probe with the model saved in ``model_dir``; the caller's random number
    generators are left as they were."""
    import torch

    with torch.random.fork_rng(devices=[]):
        model, tokenizer = load(model_dir)
        return [fill(model, tokenizer, p["text"], p["answer"], k) for p in probes]


def initial_predictions(accelerator, module, tokenizer, folder: Path,
                        probes: list[dict[str, str]]) -> list[dict]:
    """`predict` on the model as it is now (before training): exported to ``folder`` exactly as
    ``model/`` will be (`loading.export_hf_model`, which every process must call), tried on
    the main process, then deleted. Other processes get []."""

    export_hf_model(accelerator, module, tokenizer, folder)
    results = predict(folder, probes) if accelerator.is_main_process else []
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    return results


def combine(probes: list[dict], before: list[dict] | None, after: list[dict]) -> list[dict]:
    """summary.json's ``fill_mask`` entries: text, answer, top-k and rank before and after
    (before: None where the initial model was not tried, e.g. a resume of an older run)."""
    before = before if before and len(before) == len(probes) else [None] * len(probes)
    return [{"text": p["text"], "answer": p["answer"],
             "before": b["top"] if b else None, "after": a["top"],
             "rank_before": b["rank"] if b else None, "rank_after": a["rank"]}
            for p, b, a in zip(probes, before, after)]


def format_lines(entries: list[dict]) -> list[str]:
    """The log's lines for `combine`'s entries."""
    lines = [f"fill-mask check (top-{TOP_K}; rank of the masked word, before -> after training):"]
    for e in entries:
        rank_before = "n/a" if e["rank_before"] is None else e["rank_before"]
        lines.append(f"  {e['text']}  [{e['answer']}: rank {rank_before} -> {e['rank_after']}]")
        if e["before"] is not None:
            lines.append(f"    before: {', '.join(e['before'])}")
        lines.append(f"    after:  {', '.join(e['after'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlmkit.train.fill_mask",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a saved masked-LM folder, e.g. outputs/demo/model")
    parser.add_argument("texts", nargs="+", help='text with one [MASK] (or the tokenizer\'s own '
                                                 'mask token), e.g. "The [MASK] is empty."')
    parser.add_argument("--top_k", type=int, default=TOP_K)
    args = parser.parse_args(argv)
    if not Path(args.model_dir).is_dir():
        print(f"mlmkit.train.fill_mask: error: {args.model_dir}: no such folder. Fix: pass a model "
              "folder, e.g. outputs/demo/model.", file=sys.stderr)
        return 2
    model, tokenizer = load(args.model_dir)
    for text in args.texts:
        try:
            result = fill(model, tokenizer, text, k=args.top_k)
        except ValueError as err:
            print(f"mlmkit.train.fill_mask: error: {err} Fix: mask one word.", file=sys.stderr)
            return 2
        print(with_mask_token(text, tokenizer))
        for i, token in enumerate(result["top"], start=1):
            print(f"  {i}. {token}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


class FillMaskCheck:
    """The run's fill-mask check (``--fill_mask_check``): a few validation sentences, tried on
    the initial model (`before`, fresh runs; kept in the train state so a resumed run reports it
    too) and on the exported ``model/`` (`after`, main process, CPU)."""

    def __init__(self, enabled: bool, tokenizer, examples):
        self.tokenizer = tokenizer
        self.probes = choose_probes(tokenizer, examples) if enabled else []

    def before(self, accelerator, module, folder: Path, state) -> None:
        if self.probes and state.step == 0:
            state.fill_mask_before = initial_predictions(accelerator, module, self.tokenizer,
                                                         folder, self.probes)

    def after(self, accelerator, model_dir: Path, before: list[dict]) -> list[dict]:
        if not (self.probes and accelerator.is_main_process):
            return []
        entries = combine(self.probes, before, predict(model_dir, self.probes))
        for line in format_lines(entries):
            accelerator.print(line)
        return entries
