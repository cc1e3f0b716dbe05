"""corpora.py: the Lee background corpus read from gensim's wheel as pip downloads it (a small
wheel of the same layout here: the tests do not download), one document per line; a missing or
wrong archive is one line naming the fix; `make corpora` runs the command on what
`pip download` fetches."""

from __future__ import annotations

import subprocess
import zipfile

import pytest
from helpers import ROOT, run_cli

from mlmkit.data.corpora import LEE_MEMBER, cli, main

LEE = ("Hundreds of people have been forced to vacate their homes.\n"
       "\n"
       "The  United   States\tsaid today it would act.  \n"
       "A third   document.\n")


def wheel(folder, member: str = LEE_MEMBER, text: str = LEE, name: str = "gensim-4.4.0-cp311-"
          "cp311-manylinux_2_28_x86_64.whl"):
    """A gensim wheel (a zip) with the corpus at its real path, beside another member."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gensim/__init__.py", "")
        z.writestr(member, text)
    return path


@pytest.mark.parametrize("given", ["wheel", "folder"])
def test_lee_documents_are_written_one_per_line(tmp_path, given):
    path = wheel(tmp_path / "cache")
    archive = path if given == "wheel" else path.parent
    ended = run_cli(main, ["lee", str(archive), str(tmp_path / "corpora")])
    assert ended.code == 0, ended.stderr
    assert "lee_background.txt: 3 documents, 21 words" in ended.stdout
    assert (tmp_path / "corpora" / "lee_background.txt").read_text().splitlines() == [
        "Hundreds of people have been forced to vacate their homes.",
        "The United States said today it would act.", "A third document."]


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: tmp / "none.whl", "no such file or folder"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "a folder without a gensim-4.4.0-*.whl"),
    (lambda tmp: wheel(tmp, member="gensim/other.cor"), "holds no gensim/test/test_data/"),
    (lambda tmp: (tmp / "gensim-4.4.0-x.whl").write_text("no zip") and tmp / "gensim-4.4.0-x.whl",
     "not a wheel (zip)"),
])
def test_archive_mistakes_are_one_line_naming_the_fix(tmp_path, capsys, make, needle):
    archive = make(tmp_path)
    ended = run_cli(main, ["lee", str(archive), str(tmp_path / "out")])
    assert ended.code == 2 and len(ended.error_lines()) == 1
    assert needle in ended.error_lines()[0] and "Fix:" in ended.error_lines()[0]
    assert not (tmp_path / "out" / "lee_background.txt").exists()
    assert cli(["lee", str(archive), str(tmp_path / "out")]) == 2  # `python -m`: the same line
    assert capsys.readouterr().err.strip().splitlines()[-1] == ended.error_lines()[0]


def test_make_corpora_fetches_the_pinned_wheel():
    dry = subprocess.run(["make", "-n", "corpora", "STAMP="], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "download -q --no-deps --only-binary :all: gensim==4.4.0 -d .cache/corpora" in dry
    assert "-m mlmkit.data.corpora lee .cache/corpora corpora" in dry
    assert "/corpora/" in (ROOT / ".gitignore").read_text().splitlines()
