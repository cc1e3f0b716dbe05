"""probe_sets.py: the docs' command writes the embedded corpus's topic probe; the vader sets are
read from the sdist's nested archive as pip downloads it (a small archive of the same layout
here: the tests do not download), labelled by the rating's sign; `make probe-data` runs these
commands on what `pip download` fetches."""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest
from helpers import ROOT, run_cli
from readme_commands import readme_lines

from mlmkit.data.corpus import embedded_topics
from mlmkit.data.probe_file import read_probe_file
from mlmkit.data.probe_sets import VADER_FILES, cli, docs_rows, main


def test_the_docs_command_writes_a_topic_probe(tmp_path, monkeypatch):
    (line,) = readme_lines("python -m mlmkit.data.probe_sets docs")
    assert line[-1] == "probes"  # the folder the docs' launch line reads
    monkeypatch.chdir(tmp_path)
    ended = run_cli(main, line[3:])
    assert ended.code == 0, ended.stderr
    probe = read_probe_file(tmp_path / "probes" / "docs.tsv", folds=5)
    topics = embedded_topics()
    assert len(probe.texts) > 1000 and len(probe.counts()) >= 10
    assert min(probe.counts().values()) >= 20
    rows = docs_rows()
    assert sorted(zip(probe.texts, probe.labels)) == sorted(
        (" ".join(text.split()), label) for text, label in rows)
    for text, label in rows[:50]:  # each paragraph is its topic's, and only its topic's
        assert text in topics[label]
        assert sum(text in paragraphs for paragraphs in topics.values()) == 1
    assert probe.texts[:20] != [" ".join(t.split()) for t, _ in rows[:20]]  # shuffled


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def sdist(path, lines: dict[str, str]):
    """A vaderSentiment-3.3.2.tar.gz of the real layout: the ground-truth files (id, rating,
    text; CRLF) in additional_resources/hutto_ICWSM_2014.tar.gz inside it."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for name, file in VADER_FILES.items():
            _add(tar, f"hutto_ICWSM_2014/{file}", lines.get(name, "1\t0.5\tok\r\n").encode())
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "vaderSentiment-3.3.2/setup.py", b"")
        _add(tar, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
             inner.getvalue())
    return path


def test_vader_sets_are_labelled_by_the_sign_of_the_rating(tmp_path):
    movies = "".join(f"{i}\t{r}\tReview {i} &amp; more\r\n"
                     for i, r in enumerate([2.1, -0.6, 0.0, 1.5, -3.2, 0.2, -1.0, 0.7]))
    archive = sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz", {"movies": movies})
    ended = run_cli(main, ["vader", archive, tmp_path / "probes"])
    assert ended.code == 0, ended.stderr
    assert "movies.tsv: 7 texts, 2 labels (1 neutral left out)" in ended.stdout
    probe = read_probe_file(tmp_path / "probes" / "movies.tsv", folds=3)
    assert dict(zip(probe.texts, probe.labels)) == {
        "Review 0 & more": "positive", "Review 1 & more": "negative",
        "Review 3 & more": "positive", "Review 4 & more": "negative",
        "Review 5 & more": "positive", "Review 6 & more": "negative",
        "Review 7 & more": "positive"}
    assert sorted(p.name for p in (tmp_path / "probes").iterdir()) == sorted(
        f"{name}.tsv" for name in VADER_FILES)
    ended = run_cli(main, ["vader", archive, tmp_path / "few", "--max_examples", "3"])
    assert len(read_probe_file(tmp_path / "few" / "movies.tsv", folds=1).texts) == 3


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: tmp / "missing.tar.gz", "no such file. Fix: `make probe-data` downloads it"),
    (lambda tmp: (tmp / "x.tar.gz").write_text("no tar") and tmp / "x.tar.gz", "not a tar"),
])
def test_a_bad_archive_is_one_line(tmp_path, make, needle, capsys):
    ended = run_cli(main, ["vader", make(tmp_path), tmp_path / "out"])
    assert ended.code == 2 and len(ended.error_lines()) == 1
    assert needle in ended.error_lines()[0] and "Fix:" in ended.error_lines()[0]
    # `python -m mlmkit.data.probe_sets` (its `cli`): the same line, exit status 2
    assert cli(["vader", str(make(tmp_path)), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ended.error_lines()[0]


def test_make_probe_data_fetches_the_pinned_sdist_and_writes_probes():
    dry = subprocess.run(["make", "-n", "probe-data"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d " \
           ".cache/probe-data" in dry
    assert "-m mlmkit.data.probe_sets vader .cache/probe-data/vaderSentiment-3.3.2.tar.gz " \
           "probes" in dry.replace("\\\n    ", "")
    assert "-m mlmkit.data.probe_sets docs probes" in dry
    # the ablations' seeded samples (recipes/configs/ablation_*.yaml probe them)
    assert "-m mlmkit.data.probe_sets vader .cache/probe-data/vaderSentiment-3.3.2.tar.gz " \
           "probes/ablation --max_examples 500" in dry.replace("\\\n    ", "")
    assert "/probes/" in (ROOT / ".gitignore").read_text().splitlines()
