"""probe_file.py: a probe's labelled texts read from .csv, .tsv and .jsonl as written, and what
makes a file unusable for a k-fold probe refused with a DataError naming the fix (the recipe's
one-line errors for them: tests/unit/test_user_errors.py)."""

from __future__ import annotations

import pytest

from mlmkit.config.errors import DataError
from mlmkit.config.fields import MLMConfig
from mlmkit.data.probe_file import load_probe_sets, probe_name, read_probe_file, write_probe_file

ROWS = [('She said "fine",\tthen\nleft.', "b"), ("plain text", "a"), ("more, text", "a"),
        ("other", "b")]


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_written_files_read_back(tmp_path, suffix):
    path = tmp_path / f"probe{suffix}"
    assert write_probe_file(path, ROWS) == 4
    probe = read_probe_file(path, folds=2)
    # quotes, commas and tabs survive; whitespace runs (a line per example) become one space
    assert probe.texts == ['She said "fine", then left.', "plain text", "more, text", "other"]
    assert probe.labels == ["b", "a", "a", "b"]
    assert probe.counts() == {"a": 2, "b": 2}
    assert "4 texts of 2 labels" in probe.describe()
    assert not path.with_name(path.name + ".tmp").exists()


def test_other_columns_and_json_labels_of_any_type(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1, "sentence": "a b", "y": 1}\n\n{"id": 2, "sentence": "c", "y": 0}\n'
                    '{"id": 3, "sentence": "d", "y": "1"}\n{"id": 4, "sentence": "e", "y": 0}\n')
    probe = read_probe_file(path, "sentence", "y", folds=2)
    assert probe.texts == ["a b", "c", "d", "e"]
    assert probe.labels == ["1", "0", "1", "0"]  # 1 and "1": one class
    assert probe.majority_accuracy() == 0.5
    path.write_text(path.read_text() + '{"sentence": "f", "y": 1}\n')  # 3 of 5: chance is 0.6
    probe = read_probe_file(path, "sentence", "y", folds=2)
    assert probe.majority_accuracy() == 0.6
    assert probe.describe().endswith("(smallest label: 2 examples; the most frequent label "
                                     "alone scores 0.600)")


@pytest.mark.parametrize("name, content, folds, needle", [
    ("p.csv", "sentence,label\nx,a\ny,b\n", 1, "no column 'text' (row 2 has: sentence, label). "
     "Fix: pass --probe_text_column"),
    ("p.tsv", "text\tclass\nx\ta\n", 1, "Fix: pass --probe_label_column"),
    ("p.csv", "text,label\nx,a\ny,a\nz,a\n", 2, "every example has the label 'a'"),
    ("p.csv", "text,label\nx,a\ny,a\nz,b\nw,b\nv,c\n", 2,
     "the label 'c' has 1 example(s), fewer than the 2 cross-validation folds"),
    ("p.csv", "text,label\nx,a\n,b\n", 1, "row 3 has an empty text"),
    ("p.csv", "text,label\nx,a\ny\n", 1, "row 3 has an empty label"),
    ("p.csv", "text,label\n", 1, "no examples"),
    ("p.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label"\n', 1, "line 2 is not JSON"),
    ("p.jsonl", '["x", 1]\n', 1, "line 1 is not a JSON object"),
])
def test_unusable_files_name_the_fix(tmp_path, name, content, folds, needle):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="Fix:") as err:
        read_probe_file(path, folds=folds)
    assert needle in str(err.value)
    assert str(err.value).startswith(f"probe_file={str(path)!r}: ")


def test_too_few_per_label_suggests_the_folds_that_fit(tmp_path):
    path = tmp_path / "p.tsv"
    write_probe_file(path, [(f"t{i}", "a") for i in range(9)] + [(f"u{i}", "b") for i in range(3)])
    with pytest.raises(DataError, match="pass --probe_folds 3"):
        read_probe_file(path, folds=5)
    assert read_probe_file(path, folds=3).counts() == {"a": 9, "b": 3}


def test_a_run_loads_every_probe_file_in_order(tmp_path):
    """--probe_file A B: one probe set each, in order, named by the file's stem; none: empty."""
    paths = [tmp_path / "movies.tsv", tmp_path / "tweets.jsonl"]
    for path in paths:
        write_probe_file(path, ROWS)
    cfg = MLMConfig(probe_file=[str(p) for p in paths], probe_folds=2)
    sets = load_probe_sets(cfg)
    assert [probe_name(s.path) for s in sets] == ["movies", "tweets"]
    assert all(s.counts() == {"a": 2, "b": 2} for s in sets)
    assert load_probe_sets(MLMConfig()) == []
