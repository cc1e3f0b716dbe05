"""Probe files for ``--probe_file`` (docs/downstream.md), written from data that is already here
or fetched by an ordinary package client; nothing is stored in the repository.

    python -m mlmkit.data.probe_sets docs probes                 # probes/docs.tsv
    python -m mlmkit.data.probe_sets vader ARCHIVE probes        # probes/{movies,tweets,amazon,nyt}.tsv

* ``docs``: the embedded corpus's paragraphs (CPython's reference documentation, which ships with
  Python) labelled by the documentation topic they come from (`corpus.embedded_topics`): the
  topics with at least `MIN_TOPIC_EXAMPLES` paragraphs, each paragraph that appears under one
  topic only (the same paragraph under two topics would be a label it cannot have).
* ``vader``: the human-rated sentence snippets of Hutto & Gilbert (ICWSM 2014) that the
  vaderSentiment 3.3.2 source distribution ships (MIT licence; ``make probe-data`` fetches it
  with ``pip download``): Rotten Tomatoes snippets, tweets, Amazon reviews and New York Times
  editorials, labelled ``positive``/``negative`` by the sign of their mean rating (neutral ones,
  rated 0, are left out). ``ARCHIVE`` is the sdist (``vaderSentiment-3.3.2.tar.gz``) or the
  ``hutto_ICWSM_2014.tar.gz`` inside it; it is read in place (`tarfile`), never unpacked.

Rows are shuffled (seed `SHUFFLE_SEED`): a probe's batches follow the file's order, and with the
attention mask withheld a text's embedding depends on its batch's padding, as in training.
``--max_examples N`` keeps a seeded sample of N rows of each file.
"""

from __future__ import annotations

import argparse
import html
import io
import random
import sys
import tarfile
from collections import Counter
from pathlib import Path

from mlmkit.config.errors import ConfigError, DataError, exit_status
from mlmkit.data.corpus import embedded_topics
from mlmkit.data.probe_file import write_probe_file

MIN_TOPIC_EXAMPLES = 20
SHUFFLE_SEED = 0
VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
# probe file name -> the ground-truth file in hutto_ICWSM_2014/ (id, mean rating, text per line)
VADER_FILES = {"movies": "movieReviewSnippets_GroundTruth.txt",
               "tweets": "tweets_GroundTruth.txt",
               "amazon": "amazonReviewSnippets_GroundTruth.txt",
               "nyt": "nytEditorialSnippets_GroundTruth.txt"}


def docs_rows(min_examples: int = MIN_TOPIC_EXAMPLES) -> list[tuple[str, str]]:
    """(paragraph, topic) of the embedded corpus: paragraphs under one topic only, topics with at
    least ``min_examples`` of them, in the corpus's order."""
    topics = embedded_topics()
    seen = Counter(p for paragraphs in topics.values() for p in paragraphs)
    rows = []
    for topic, paragraphs in topics.items():
        own = [p for p in paragraphs if seen[p] == 1]
        if len(own) >= min_examples:
            rows += [(p, topic) for p in own]
    return rows


def _vader_archive(path: Path) -> tarfile.TarFile:
    """The hutto_ICWSM_2014 archive, opened from the sdist (its inner tarball read in memory) or
    given directly."""
    if not path.is_file():
        raise ConfigError(f"archive {str(path)!r}: no such file. Fix: `make probe-data` downloads "
                          "it (pip download --no-deps --no-binary :all: vaderSentiment==3.3.2).")
    try:
        outer = tarfile.open(path)
    except (tarfile.TarError, OSError):
        raise DataError(f"archive {str(path)!r}: not a tar archive. Fix: pass the "
                        "vaderSentiment-3.3.2.tar.gz that pip downloaded.") from None
    with outer:
        names = outer.getnames()
        if any(n.endswith("/" + VADER_FILES["movies"]) for n in names):
            return tarfile.open(path)
        inner = next((n for n in names if n.endswith(VADER_INNER)), None)
        if inner is None:
            raise DataError(f"archive {str(path)!r}: holds no {VADER_INNER}. Fix: pass the "
                            "vaderSentiment 3.3.2 source distribution (--no-binary :all:).")
        data = outer.extractfile(inner).read()
    return tarfile.open(fileobj=io.BytesIO(data))


def vader_rows(archive: tarfile.TarFile, name: str) -> tuple[list[tuple[str, str]], int]:
    """(text, positive|negative) of one ground-truth file, in its order, and how many neutral
    (rated 0) snippets were left out."""
    member = next(m for m in archive.getmembers() if m.name.endswith("/" + VADER_FILES[name]))
    rows, neutral = [], 0
    for line in archive.extractfile(member).read().decode("utf-8", "replace").splitlines():
        parts = line.strip().split("\t", 2)
        if len(parts) < 3 or not parts[2].strip():
            continue
        rating = float(parts[1])
        if rating == 0:
            neutral += 1
            continue
        rows.append((html.unescape(parts[2].strip()), "positive" if rating > 0 else "negative"))
    return rows, neutral


def _sample(rows: list, max_examples: int | None) -> list:
    """``rows`` shuffled with `SHUFFLE_SEED`, the first ``max_examples`` of them when given."""
    rows = list(rows)
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows[:max_examples] if max_examples else rows


def _write(folder: Path, name: str, rows: list, max_examples: int | None, note: str = "") -> Path:
    path = folder / f"{name}.tsv"
    rows = _sample(rows, max_examples)
    write_probe_file(path, rows)
    labels = Counter(label for _, label in rows)
    print(f"{path}: {len(rows)} texts, {len(labels)} labels{note}")
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m mlmkit.data.probe_sets",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    docs = sub.add_parser("docs", help="the embedded corpus's paragraphs, labelled by topic")
    docs.add_argument("output_dir")
    vader = sub.add_parser("vader", help="sentiment snippets from the vaderSentiment 3.3.2 sdist")
    vader.add_argument("archive", help="vaderSentiment-3.3.2.tar.gz (make probe-data fetches it)")
    vader.add_argument("output_dir")
    for command in (docs, vader):
        command.add_argument("--max_examples", type=int, default=None,
                             help="keep a seeded sample of N rows of each file")
    args = parser.parse_args(argv)
    if args.max_examples is not None and args.max_examples < 1:
        raise ConfigError(f"--max_examples={args.max_examples}: must be at least 1. Fix: pass a "
                          "positive number or drop it.")
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if args.source == "docs":
        return [_write(folder, "docs", docs_rows(), args.max_examples)]
    written = []
    with _vader_archive(Path(args.archive)) as archive:
        for name in VADER_FILES:
            rows, neutral = vader_rows(archive, name)
            written.append(_write(folder, name, rows, args.max_examples,
                                  f" ({neutral} neutral left out)"))
    return written


def cli(argv: list[str] | None = None) -> int:
    """`main` as a command: a ConfigError or DataError is one ``mlmkit: error:`` line (with its
    fix) and exit status 2, as the recipe's (`errors.exit_status`)."""
    return exit_status(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
