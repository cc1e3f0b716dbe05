"""Tokenize a corpus once into a folder that any number of training runs read (--tokenized_dir).

    python recipes/pretokenize.py --output_dir DIR [--num_shards N] [recipe data flags]
    python recipes/pretokenize.py --output_dir /shared/tok/wiki-128 \\
        --train_file "/shared/wiki/*.parquet" --preprocessing_num_workers 16
    accelerate launch recipes/mlm.py --tokenized_dir /shared/tok/wiki-128 ...

The data flags are the training recipe's (--train_file incl. globs of shards, --dataset_name,
--mixture_files/--mixture_weights, --model_name_or_path/--tokenizer_name, --max_seq_length,
--line_by_line, --text_column, --max_train_samples, ...), and the examples are exactly those a run
with the same flags would build (mlmkit.data.load_and_tokenize); --preprocessing_num_workers
processes tokenize. --output_dir is the destination: it must not exist or be empty, and it
appears only once complete (built in <DIR>.tmp-<pid>, then renamed). --num_shards: Arrow files per
split (default: about 500 MB each). Contract and metadata: mlmkit/data/pretokenize.py.

Exit status 2 with one `mlmkit: error: ... Fix: ...` line for a bad flag, destination or corpus.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if SRC.is_dir() and str(SRC) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(SRC))

from mlmkit.config.errors import ConfigError  # noqa: E402
from mlmkit.config.fields import MLMConfig  # noqa: E402
from mlmkit.config.parse import parse_config  # noqa: E402

USAGE = ("usage: python recipes/pretokenize.py --output_dir DIR [--num_shards N] "
         "[recipe data flags, see below]")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(USAGE)
    args, num_shards = split_num_shards(argv)
    cfg = parse_config(args)
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in args) and \
            cfg.output_dir == MLMConfig().output_dir:
        raise ConfigError("no destination folder. Fix: pass --output_dir DIR (a new or empty "
                          "folder, e.g. on the shared filesystem the runs read from).")
    if (cfg.preprocessing_num_workers or 1) > 1:  # forked workers: no Rust threads in each
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from mlmkit.data.pretokenize import check_destination, pretokenize, source_name
    check_destination(cfg, Path(cfg.output_dir), num_shards)  # before any work is announced
    workers = cfg.preprocessing_num_workers or 1
    print(f"pretokenize: {source_name(cfg)} -> {cfg.output_dir} (max_seq_length "
          f"{cfg.max_seq_length}, line_by_line {str(cfg.line_by_line).lower()}, {workers} "
          f"worker{'s' if workers > 1 else ''})", flush=True)
    metadata = pretokenize(cfg, cfg.output_dir, num_shards=num_shards)
    if metadata["repair_warning"]:
        print(f"mlmkit: warning: {metadata['repair_warning']}", file=sys.stderr)
    print(summary_line(metadata, cfg.output_dir))
    print(f"train from it: {training_command(cfg)}")
    return metadata


def split_num_shards(argv: list[str]) -> tuple[list[str], int | None]:
    """``argv`` without ``--num_shards N`` (this command's own flag), and N."""
    args, num_shards, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--num_shards" or arg.startswith("--num_shards="):
            value = arg.split("=", 1)[1] if "=" in arg else \
                (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            try:
                num_shards = int(value)
            except ValueError:
                raise ConfigError(f"--num_shards {value!r}: not an integer. Fix: pass e.g. "
                                  "--num_shards 8, or drop it.") from None
            continue
        args.append(arg)
        i += 1
    return args, num_shards


def summary_line(metadata: dict, out_dir: str) -> str:
    splits = metadata["splits"]
    tokens = sum(split["tokens"] for split in splits.values())
    return (f"pretokenized: {splits['train']['examples']:,} train + "
            f"{splits['validation']['examples']:,} validation examples, {tokens:,} tokens in "
            f"{metadata['seconds']:.1f} s ({metadata['tokens_per_second']:,.0f} tokens/s) "
            f"-> {out_dir}")


def training_command(cfg: MLMConfig) -> str:
    """The training command line, with the flags a run from the folder must repeat."""
    words = ["accelerate", "launch", "recipes/mlm.py", "--tokenized_dir", cfg.output_dir]
    if cfg.model_name_or_path:
        words += ["--model_name_or_path", cfg.model_name_or_path]
    if cfg.tokenizer_name:
        words += ["--tokenizer_name", cfg.tokenizer_name]
    if cfg.max_seq_length != MLMConfig().max_seq_length:
        words += ["--max_seq_length", str(cfg.max_seq_length)]
    if cfg.line_by_line != MLMConfig().line_by_line:
        words += ["--line_by_line", str(cfg.line_by_line).lower()]
    return " ".join(shlex.quote(w) for w in words) + " ..."


if __name__ == "__main__":
    from mlmkit.cli import run_cli
    run_cli(main)
