"""Training corpora beside the embedded one, written from an archive an ordinary package client
fetched; nothing is stored in the repository.

    python -m mlmkit.data.corpora lee .cache/corpora corpora     # corpora/lee_background.txt

* ``lee``: the Lee background corpus that gensim 4.4.0's wheel ships as test data
  (``gensim/test/test_data/lee_background.cor``; LGPL-2.1, as gensim): 300 English news
  documents (about 60k words), one per line. ``make ablation-trained-head`` fetches the wheel with
  ``pip download gensim==4.4.0 --no-deps --only-binary :all:`` into ``.cache/corpora/``; the
  member is read from the wheel (a zip) in place, never unpacked. ``ARCHIVE`` is the wheel or the
  folder holding it. Written as a text file (one document per line, blank lines dropped) for
  ``--train_file``: the trained-head regime's first phase (docs/padding-ablation.md).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from mlmkit.config.errors import ConfigError, DataError, exit_status
from mlmkit.config.fileio import atomic_write_text

GENSIM_WHEEL = "gensim-4.4.0-*.whl"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
FETCH = "pip download gensim==4.4.0 --no-deps --only-binary :all: -d .cache/corpora"


def _wheel(path: Path) -> Path:
    """The gensim wheel: ``path`` itself, or the newest-named `GENSIM_WHEEL` in the folder."""
    if path.is_dir():
        wheels = sorted(path.glob(GENSIM_WHEEL))
        if not wheels:
            raise ConfigError(f"archive {str(path)!r}: a folder without a {GENSIM_WHEEL}. Fix: "
                              f"`{FETCH}` fetches it (make ablation-trained-head does).")
        return wheels[-1]
    if not path.is_file():
        raise ConfigError(f"archive {str(path)!r}: no such file or folder. Fix: `{FETCH}` "
                          "fetches it (make ablation-trained-head does).")
    return path


def lee_documents(archive: str | Path) -> list[str]:
    """The Lee background corpus's documents (whitespace collapsed, empty lines dropped), read
    from gensim's wheel (or the folder holding it)."""
    wheel = _wheel(Path(archive))
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(LEE_MEMBER)
    except zipfile.BadZipFile:
        raise DataError(f"archive {str(wheel)!r}: not a wheel (zip). Fix: pass the gensim wheel "
                        f"that `{FETCH}` downloaded.") from None
    except KeyError:
        raise DataError(f"archive {str(wheel)!r}: holds no {LEE_MEMBER}. Fix: pass gensim "
                        f"4.4.0's wheel (`{FETCH}`).") from None
    lines = data.decode("utf-8", "replace").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip()]


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m mlmkit.data.corpora",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    lee = sub.add_parser("lee", help="the Lee background news corpus from gensim 4.4.0's wheel")
    lee.add_argument("archive", help="the gensim wheel, or the folder pip downloaded it into")
    lee.add_argument("output_dir")
    args = parser.parse_args(argv)
    documents = lee_documents(args.archive)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lee_background.txt"
    atomic_write_text(path, "\n".join(documents) + "\n")
    words = sum(len(d.split()) for d in documents)
    print(f"{path}: {len(documents)} documents, {words} words")
    return [path]


def cli(argv: list[str] | None = None) -> int:
    """`main` as a command: a ConfigError or DataError is one ``mlmkit: error:`` line (with its
    fix) and exit status 2, as the recipe's (`errors.exit_status`)."""
    return exit_status(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
