import pytest

from mlmkit.config.errors import DataError
from mlmkit.config.parse import parse_config
from mlmkit.data.corpus import (
    IndexedExamples,
    embedded_corpus,
    load_raw_datasets,
    tokenize_datasets,
)
from mlmkit.data.files import DataRepairs


def test_embedded_corpus_is_cpython_docs_split_90_10(tokenizer):
    paragraphs = embedded_corpus()
    assert len(paragraphs) > 2000 and all(p == p.strip() and p for p in paragraphs)
    raw = load_raw_datasets(parse_config([]))
    n_train, n_val = len(raw["train"]), len(raw["validation"])
    assert n_train + n_val == len(paragraphs)
    assert abs(n_val / len(paragraphs) - 0.10) < 0.01
    # the split is fixed: the same whatever the run's seed
    again = load_raw_datasets(parse_config(["--seed", "123"]))
    assert again["validation"]["text"] == raw["validation"]["text"]


def test_line_by_line_truncates_and_drops_blank_lines(tmp_path, tokenizer):
    file = tmp_path / "t.txt"
    long_line = " ".join(["word"] * 300)
    file.write_text(f"hello world\n\n   \n{long_line}\nlast line\n")
    cfg = parse_config(["--train_file", str(file), "--validation_file", str(file),
                        "--max_seq_length", "16"])
    tok = tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)
    ids = tok["train"]["input_ids"]
    assert len(ids) == 3
    assert max(len(x) for x in ids) == 16
    assert tok["train"]["length"] == [len(x) for x in ids]
    # special tokens mask computed at tokenization: [CLS] ... [SEP]
    stm = tok["train"]["special_tokens_mask"][0]
    assert stm[0] == 1 and stm[-1] == 1 and sum(stm) == 2


def test_grouped_blocks_keep_the_remainder(tmp_path, tokenizer):
    file = tmp_path / "t.txt"
    file.write_text("\n".join(f"sentence number {i} is here" for i in range(50)) + "\n")
    cfg = parse_config(["--train_file", str(file), "--validation_file", str(file),
                        "--line_by_line", "false", "--max_seq_length", "32"])
    tok = tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)
    total = sum(len(tokenizer(f"sentence number {i} is here")["input_ids"]) for i in range(50))
    lengths = tok["train"]["length"]
    assert sum(lengths) == total  # nothing dropped
    assert all(n == 32 for n in lengths[:-1]) and 0 < lengths[-1] <= 32

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n")
    cfg = parse_config(["--train_file", str(tiny), "--validation_file", str(tiny),
                        "--line_by_line", "false", "--max_seq_length", "128"])
    tok = tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)
    assert len(tok["train"]) == 1  # a corpus shorter than one block still yields one example


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_tabular_files_and_text_column(tmp_path, tokenizer, suffix):
    import datasets
    ds = datasets.Dataset.from_dict({"content": [f"row {i} of text" for i in range(20)]})
    path = tmp_path / f"d.{suffix}"
    getattr(ds, f"to_{suffix}")(str(path))
    cfg = parse_config(["--train_file", str(path), "--text_column", "content"])
    raw = load_raw_datasets(cfg)
    assert len(raw["train"]) == 18 and len(raw["validation"]) == 2
    with pytest.raises(DataError, match="text_column"):
        load_raw_datasets(parse_config(["--train_file", str(path)]))


@pytest.mark.parametrize("content", [b"", b"\n \n\n\t\n"], ids=["zero_bytes", "blank_lines"])
@pytest.mark.parametrize("which", ["train", "validation"])
def test_an_empty_file_is_an_error_that_says_it_is_empty(tmp_path, tokenizer, content, which):
    good = tmp_path / "good.txt"
    good.write_text("some text\nmore text\n")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(content)
    files = {"train": good, "validation": good, which: empty}
    cfg = parse_config(["--train_file", str(files["train"]),
                        "--validation_file", str(files["validation"])])
    with pytest.raises(DataError) as err:
        tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)
    message = str(err.value)
    assert f"{which}_file={str(empty)!r} is empty" in message and "Fix:" in message
    assert ("0 bytes" if not content else "only blank lines") in message


def test_undecodable_bytes_are_replaced_counted_and_reported(tmp_path, tokenizer, capsys,
                                                             monkeypatch):
    file = tmp_path / "dirty.txt"
    lines = [f"good line number {i}".encode() for i in range(20)]
    lines[6] = b"a Latin-1 caf\xe9 in a UTF-8 file"
    lines[13] = b"broken \xff\xfe bytes and \xc3 a cut sequence"
    lines[17] = "a real replacement character \ufffd is not a repair".encode()
    file.write_bytes(b"\n".join(lines) + b"\n")
    cfg = parse_config(["--train_file", str(file), "--validation_file", str(file)])

    repairs = DataRepairs()
    raw = load_raw_datasets(cfg, repairs)
    text = [t.rstrip("\n") for t in raw["train"]["text"]]
    assert len(text) == 20  # nothing dropped: the bad bytes became U+FFFD
    assert text[6] == "a Latin-1 caf\ufffd in a UTF-8 file"
    assert text[13].startswith("broken \ufffd\ufffd bytes")
    assert repairs.lines == {str(file): 2} and repairs.first == {str(file): 7}
    assert repairs.total == 2  # train and validation read the same file: counted once, per file
    warning = repairs.warning()
    assert "\n" not in warning and "2 lines of" in warning and "(first: line 7)" in warning
    assert "U+FFFD" in warning
    assert mlmkit_lines(capsys) == []  # the caller reports it
    tok = tokenize_datasets(raw, tokenizer, cfg)  # and training data follows
    assert len(tok["train"]) == 20

    # without a DataRepairs to fill, the main process prints the one line itself
    monkeypatch.delenv("RANK", raising=False)
    load_raw_datasets(cfg)
    err = mlmkit_lines(capsys)
    assert len(err) == 1 and err[0].startswith("mlmkit: warning: 2 lines of")
    monkeypatch.setenv("RANK", "1")  # other processes stay quiet
    load_raw_datasets(cfg)
    assert mlmkit_lines(capsys) == []


def mlmkit_lines(capsys) -> list[str]:
    """stderr lines of our own (datasets' progress bars go there too)."""
    err = capsys.readouterr().err.replace("\r", "\n")
    return [line for line in err.splitlines() if line.startswith("mlmkit")]


def test_a_clean_file_reports_no_repairs_even_with_a_real_replacement_character(tmp_path):
    file = tmp_path / "clean.txt"
    file.write_text("plain text\nwith a genuine \ufffd character\nand more\n", encoding="utf-8")
    repairs = DataRepairs()
    load_raw_datasets(parse_config(["--train_file", str(file), "--validation_file", str(file)]),
                      repairs)
    assert repairs.total == 0 and repairs.warning() is None


def test_undecodable_bytes_in_a_csv_are_replaced_too(tmp_path):
    file = tmp_path / "dirty.csv"
    file.write_bytes(b"text\n" + b"".join(f"row {i}\n".encode() for i in range(9))
                     + b"bad \xff row\n")
    repairs = DataRepairs()
    raw = load_raw_datasets(parse_config(["--train_file", str(file)]), repairs)
    assert len(raw["train"]) + len(raw["validation"]) == 10
    assert repairs.lines == {str(file): 1} and repairs.first == {str(file): 11}


def test_hub_loading_path_on_a_local_copy(tmp_path, tokenizer):
    """--dataset_name goes through datasets.load_dataset, here on a local dataset folder."""
    import datasets
    folder = tmp_path / "my_dataset"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": [f"train line {i}" for i in range(10)]}).to_parquet(
        str(folder / "data" / "train-00000.parquet"))
    datasets.Dataset.from_dict({"text": ["held out line"]}).to_parquet(
        str(folder / "data" / "validation-00000.parquet"))
    cfg = parse_config(["--dataset_name", str(folder)])
    raw = load_raw_datasets(cfg)
    assert len(raw["train"]) == 10 and raw["validation"]["text"] == ["held out line"]


def test_indexed_examples_carry_their_index(tokenizer):
    cfg = parse_config(["--max_train_samples", "10"])
    tok = tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)
    ex = IndexedExamples(tok["train"])
    assert len(ex) == 10
    batch = ex.fetch([3, 7])
    assert [b["idx"] for b in batch] == [3, 7]
    assert batch[1]["input_ids"] == ex[7]["input_ids"]


def _compress(path, data: bytes, suffix: str):
    """``path`` + ``suffix``, holding ``data`` compressed as that suffix says."""
    import bz2
    import gzip
    import lzma

    import zstandard
    out = path.with_name(path.name + suffix)
    pack = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": zstandard.ZstdCompressor().compress}[suffix]
    out.write_bytes(pack(data))
    return out


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_files_are_read_as_shipped(tmp_path, tokenizer, suffix):
    """train.txt.gz (and .bz2, .xz, .zst) trains on what train.txt holds. Bytes that are not
    UTF-8 are repaired in plain files only: in a compressed one they are an error naming the
    line and the fix."""
    lines = [f"sentence {i} of the compressed corpus".encode() for i in range(40)]
    data = b"\n".join(lines) + b"\n"
    plain = tmp_path / "train.txt"
    plain.write_bytes(data)
    packed = _compress(plain, data, suffix)
    args = ["--validation_file", str(plain), "--max_seq_length", "16"]
    plain_cfg = parse_config(["--train_file", str(plain), *args])
    want = tokenize_datasets(load_raw_datasets(plain_cfg), tokenizer, plain_cfg)
    cfg = parse_config(["--train_file", str(packed), *args])
    got = tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)
    assert got["train"]["input_ids"] == want["train"]["input_ids"]

    lines[9] = b"a Latin-1 caf\xe9"
    dirty = _compress(tmp_path / "dirty.txt", b"\n".join(lines) + b"\n", suffix)
    with pytest.raises(DataError, match=r"1 line \(first: line 10\) hold bytes that are not "
                                        r"UTF-8.*Fix: convert it to UTF-8"):
        load_raw_datasets(parse_config(["--train_file", str(dirty), *args]))


def test_each_split_in_its_own_format(tmp_path, tokenizer):
    """A .jsonl.gz train file beside a .txt validation file: each split read with its own
    builder (datasets' one load_dataset call takes one)."""
    import json
    train = _compress(tmp_path / "train.jsonl",
                      "".join(json.dumps({"text": f"train row {i}"}) + "\n"
                              for i in range(30)).encode(), ".gz")
    valid = tmp_path / "valid.txt"
    valid.write_text("".join(f"validation line {i}\n" for i in range(7)))
    raw = load_raw_datasets(parse_config(["--train_file", str(train),
                                          "--validation_file", str(valid)]))
    assert raw["train"]["text"][:2] == ["train row 0", "train row 1"] and len(raw["train"]) == 30
    assert [t.strip() for t in raw["validation"]["text"]] == [f"validation line {i}"
                                                              for i in range(7)]


@pytest.mark.parametrize("files, needle", [
    (["a.txt", "b.jsonl"], r"mixed file types \['.jsonl', '.txt'\]"),
    (["a.txt.gz", "b.json.gz"], r"mixed file types \['.json.gz', '.txt.gz'\]"),
    (["a.txt.rar"], r"unsupported or mixed file types \['.rar'\]"),
])
def test_one_split_in_two_formats_is_refused_with_the_fix(tmp_path, files, needle):
    for name in files:
        (tmp_path / name).write_bytes(b"x\n")
    with pytest.raises(DataError, match=needle) as err:
        load_raw_datasets(parse_config(["--train_file", str(tmp_path / "*")]))
    assert "Fix: use one of" in str(err.value) and ".zst" in str(err.value)
    assert "\n" not in str(err.value)
