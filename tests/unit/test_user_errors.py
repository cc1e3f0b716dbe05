"""The suite of user mistakes: every kind ends in one ``mlmkit: error: ... Fix: ...`` line, exit
status 2, and nothing left behind in --output_dir.

Each case runs the recipe's ``main(argv)`` in process, through ``cli.run_cli`` exactly as
``recipes/mlm.py`` does at the command line (so the exit status and the printed line are what a
user sees), or, where a launch would be needed to reach it, calls the failing function under
``run_cli``. The real launches are in tests/integration/test_recipe.py.

Cases are grouped by where the mistake is: the model folder, the tokenizer, the lengths, the
data, the arguments, the paths (output folder, resume) and the launch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import RECIPE, load_script, run_cli, tiny_config_dir, tiny_model

from mlmkit.config.errors import ConfigError

BASE = ["--report_to", "none", "--progress_bar", "false", "--fill_mask_check", "false",
        "--max_train_samples", "32", "--max_eval_samples", "16", "--max_train_steps", "2"]


# ================================================================================ helpers
@pytest.fixture(scope="module")
def recipe():
    """recipes/mlm.py as a module (its main(argv) is what `accelerate launch` runs)."""
    return load_script(RECIPE)


def _listing(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.is_dir() else None


def assert_user_error(call, needle: str, out: Path | None = None) -> str:
    """``call()`` under `cli.run_cli` exits with status 2 after one ``mlmkit: error: ... Fix:
    ...`` line containing ``needle``, and ``out`` is as it was (absent, or with the same files)."""
    before = None if out is None else (_listing(out), out.is_file())
    ended = run_cli(lambda _argv: call(), [])
    err, lines = ended.stderr, ended.error_lines()
    assert ended.code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Fix:" in lines[0], lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err, err[-2000:]
    if out is not None:
        assert (_listing(out), out.is_file()) == before, f"{out} changed: {_listing(out)}"
    return lines[0]


@pytest.fixture
def fails(recipe, tmp_path):
    """fails(args, needle, out=None): the recipe run with ``args`` (+ a fast run's flags and
    --output_dir ``out``, default tmp_path/run) is refused with one line naming the fix."""
    def check(args: list[str], needle: str, out: Path | None = None) -> str:
        out = out or tmp_path / "run"
        argv = [*BASE, *args] + ([] if "--output_dir" in args else ["--output_dir", str(out)])
        return assert_user_error(lambda: recipe.main(argv), needle, out)
    return check


@pytest.fixture(scope="module")
def good_model(tmp_path_factory, tokenizer_path) -> Path:
    """A tiny BERT saved as users save models: config.json, model.safetensors, tokenizer."""
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("good_model")
    tiny_model("bert").save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
    return path


@pytest.fixture
def model(good_model, tmp_path) -> Path:
    """A copy of the good model folder, to break."""
    return Path(shutil.copytree(good_model, tmp_path / "model"))


def _drop_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _tiny_config(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def word_tokenizer(folder: Path, words=("the", "cat", "sat"), **specials) -> Path:
    """A word-level fast tokenizer (no subword marks) with the given special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate([*dict.fromkeys(specials.values()), *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(folder)
    return folder


BERT_SPECIALS = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                     mask_token="[MASK]")


# ================================================================================ the six
# The inputs of the issue, each once more here by name (they are also in the groups below).
def test_model_folder_without_tokenizer_files(fails, model):
    _drop_tokenizer(model)
    line = fails(["--model_name_or_path", str(model)], "has no tokenizer files")
    assert "--tokenizer_name" in line


def test_truncated_safetensors(fails, model):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fails(["--model_name_or_path", str(model)], "model.safetensors is not a complete "
          "safetensors file (truncated")


def test_max_seq_length_beyond_the_positions(fails, model):
    line = fails(["--model_name_or_path", str(model), "--max_seq_length", "1024"],
                 "takes at most 512 tokens")
    assert "--max_seq_length 512" in line


def test_max_seq_length_with_no_room_to_mask(fails, model):
    fails(["--model_name_or_path", str(model), "--max_seq_length", "2"], "no token to mask")


def test_output_dir_naming_an_existing_file(fails, tmp_path, tiny_args):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    fails([*tiny_args, "--output_dir", str(file)], "is an existing file", out=file)
    assert file.read_text() == "mine\n"


def test_stray_positional_arguments(fails, tmp_path, tiny_args):
    (tmp_path / "a.txt").write_text("one line\nanother\n")
    (tmp_path / "b.parquet").write_text("")
    line = fails([*tiny_args, "--train_file", str(tmp_path / "a.txt"),
                  str(tmp_path / "b.parquet")], "unexpected argument(s)")
    assert "quote globs" in line


# ================================================================================ model folder
def _weights_empty(m):
    (m / "model.safetensors").write_bytes(b"")


def _weights_lfs_pointer(m):
    (m / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                         "oid sha256:0123\nsize 4194304\n")


def _weights_torch_zip(m):
    torch.save({"w": torch.zeros(2)}, m / "model.safetensors")


def _weights_html(m):
    (m / "model.safetensors").write_text("<!DOCTYPE html><html><body>404</body></html>\n" * 4)


def _bin_truncated(m):
    from safetensors.torch import load_file
    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    data = (m / "pytorch_model.bin").read_bytes()
    (m / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    assert not zipfile.is_zipfile(m / "pytorch_model.bin")


def _missing_shard(m):
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "bert.embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
        "cls.predictions.bias": "model-00002-of-00002.safetensors"}}))


def _no_weights(m):
    (m / "model.safetensors").unlink()


def _only_tf_weights(m):
    (m / "model.safetensors").unlink()
    (m / "tf_model.h5").write_bytes(b"\x89HDF\r\n")


def _no_config(m):
    (m / "config.json").unlink()


def _config_not_json(m):
    (m / "config.json").write_text("{model_type: bert,")


def _config_without_model_type(m):
    config = json.loads((m / "config.json").read_text())
    del config["model_type"]
    (m / "config.json").write_text(json.dumps(config))


def _config_unknown_model_type(m):
    _edit_config(m, model_type="bertish")


def _config_not_matching_weights(m):
    _edit_config(m, intermediate_size=128)


def _sentence_transformers_layout(m):
    inner = m / "0_Transformer"
    inner.mkdir()
    for item in list(m.iterdir()):
        if item != inner:
            item.rename(inner / item.name)
    (m / "modules.json").write_text("[]")


MODEL_FOLDER_MISTAKES = {
    "weights-empty": (_weights_empty, "model.safetensors is empty (0 bytes)"),
    "weights-git-lfs-pointer": (_weights_lfs_pointer, "is a Git LFS pointer"),
    "weights-torch-zip-named-safetensors": (_weights_torch_zip, "is a PyTorch zip archive"),
    "weights-html-page": (_weights_html, "is an HTML/XML page"),
    "weights-bin-truncated": (_bin_truncated, "pytorch_model.bin is truncated"),
    "weights-shard-missing": (_missing_shard, "missing shard"),
    "weights-none": (_no_weights, "holds no weights"),
    "weights-tensorflow-only": (_only_tf_weights, "holds only tf_model.h5 (not PyTorch)"),
    "weights-not-matching-config": (_config_not_matching_weights, "do not match its config.json"),
    "config-missing": (_no_config, "has no config.json"),
    "config-not-json": (_config_not_json, "config.json is not readable JSON"),
    "config-without-model-type": (_config_without_model_type, "names no model type"),
    "config-unknown-model-type": (_config_unknown_model_type, "names no model type"),
    "config-in-a-subfolder": (_sentence_transformers_layout, "subfolder '0_Transformer' has one"),
}


@pytest.mark.parametrize("kind", MODEL_FOLDER_MISTAKES)
def test_model_folder_mistakes(fails, model, kind):
    breaks, needle = MODEL_FOLDER_MISTAKES[kind]
    breaks(model)
    fails(["--model_name_or_path", str(model)], needle)


def test_no_weights_suggests_training_from_scratch(fails, model):
    _no_weights(model)
    assert "--config_name" in fails(["--model_name_or_path", str(model)], "holds no weights")


@pytest.mark.parametrize("flag", ["--model_name_or_path", "--config_name"])
def test_model_path_that_does_not_exist(fails, tmp_path, flag):
    fails([flag, str(tmp_path / "no" / "such" / "model")], "(and not a Hub id)")


def test_model_path_naming_a_file(fails, model):
    line = fails(["--model_name_or_path", str(model / "model.safetensors")],
                 "is a file, not a folder")
    assert str(model) in line


def test_hub_id_that_cannot_be_loaded(fails, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fails(["--model_name_or_path", "mlmkit-tests/no-such-model"],
          "could not be loaded from the Hugging Face Hub")


def test_architecture_without_masked_lm_head(fails, tmp_path):
    gpt2 = _tiny_config(tmp_path / "gpt2", model_type="gpt2", n_embd=32, n_layer=2, n_head=2)
    fails(["--config_name", str(gpt2)], "has no masked-LM head")


def test_config_with_impossible_sizes(fails, tmp_path):
    bad = _tiny_config(tmp_path / "bad", **{**tiny_model("bert").config.to_dict(),
                                            "hidden_size": 30, "num_attention_heads": 4})
    fails(["--config_name", str(bad)], "transformers cannot build this model")


def test_attn_implementation_the_architecture_lacks(fails, tmp_path):
    convbert = tiny_config_dir(tmp_path / "convbert", "convbert")
    line = fails(["--config_name", str(convbert), "--attn_implementation", "sdpa"],
                 "transformers cannot build this model")
    assert "--attn_implementation" in line


# ================================================================================ tokenizer
def test_tokenizer_name_that_does_not_exist(fails, tiny_bert_dir, tmp_path):
    fails(["--config_name", tiny_bert_dir, "--tokenizer_name", str(tmp_path / "no/such/tok")],
          "tokenizer_name=")


def test_tokenizer_name_naming_a_file(fails, tiny_bert_dir, good_model):
    fails(["--config_name", tiny_bert_dir, "--tokenizer_name",
           str(good_model / "tokenizer.json")], "is a file, not a folder")


def test_tokenizer_folder_with_only_its_config(fails, tiny_bert_dir, good_model, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(good_model / "tokenizer_config.json", folder)
    fails(["--config_name", tiny_bert_dir, "--tokenizer_name", str(folder)],
          "has no tokenizer files")


def test_tokenizer_json_damaged(fails, model):
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    fails(["--model_name_or_path", str(model)], "the tokenizer could not be loaded")


@pytest.mark.parametrize("missing", ["mask_token", "pad_token"])
def test_tokenizer_without_mask_or_pad_token(fails, tiny_bert_dir, tmp_path, missing):
    specials = {k: v for k, v in BERT_SPECIALS.items() if k != missing}
    folder = word_tokenizer(tmp_path / "tok", **specials)
    fails(["--config_name", tiny_bert_dir, "--tokenizer_name", str(folder)],
          "has no mask or pad token")


def test_tokenizer_with_only_special_tokens(fails, tiny_bert_dir, tmp_path):
    folder = word_tokenizer(tmp_path / "tok", words=(), **BERT_SPECIALS)
    fails(["--config_name", tiny_bert_dir, "--tokenizer_name", str(folder)],
          "has no ordinary tokens")


@pytest.mark.parametrize("flag", ["--whole_word_mask", "--span_masking"])
def test_word_masking_with_a_tokenizer_without_word_marks(fails, tiny_bert_dir, tmp_path, flag):
    folder = word_tokenizer(tmp_path / "tok", **BERT_SPECIALS)
    fails(["--config_name", tiny_bert_dir, "--tokenizer_name", str(folder), flag],
          f"'▁'). Fix: drop {flag}, or use a tokenizer with one of those schemes.")


# ================================================================================ lengths
def test_position_offset_of_roberta_style_models(fails, tmp_path, tokenizer_path):
    """A RoBERTa-style model reserves padding_idx + 1 positions: 130 - 2 = 128 tokens."""
    roberta = tmp_path / "roberta"
    tiny_model("roberta", pad_token_id=1, max_position_embeddings=130).config.save_pretrained(
        roberta)
    args = ["--config_name", str(roberta), "--tokenizer_name", tokenizer_path]
    line = fails([*args, "--max_seq_length", "129"], "takes at most 128 tokens")
    assert "reserves the first 2" in line

    from mlmkit.config.parse import parse_config
    from mlmkit.model import checks as modelcheck
    cfg = parse_config([*args, "--max_seq_length", "128"])
    config, offset = modelcheck.check_model_source(cfg)
    assert offset == 2 and modelcheck.max_positions(config, offset) == 128
    tokenizer = modelcheck.load_tokenizer(cfg)  # 128 fits: no error
    modelcheck.check_lengths(parse_config([*args, "--max_seq_length", "3"]), config, tokenizer,
                             offset)  # the shortest length with a token to mask


@pytest.mark.parametrize("value, needle", [("0", "must be at least 1"),
                                           ("100000", "larger than any supported encoder")])
def test_max_seq_length_out_of_any_range(fails, tiny_args, value, needle):
    fails([*tiny_args, "--max_seq_length", value], needle)


# ================================================================================ data
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_train_file_mistakes(fails, tiny_args, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.txt").write_text("some text\n")
    cases = [
        (["--train_file", str(tmp_path / "missing.txt")], "no such file"),
        (["--train_file", str(shards)], "is a folder, not a file"),
        (["--train_file", str(tmp_path / "nothing-*.parquet")], "the pattern matches no file"),
        (["--train_file", str(shards / "part-0.txt"), "--validation_file", str(shards)],
         "validation_file="),
        (["--validation_file", str(shards / "part-0.txt")], "given without train_file"),
        (["--dataset_name", "./no/such/dataset"], "no such folder"),
        (["--dataset_name", "wikitext", "--train_file", str(shards / "part-0.txt")],
         "given together with"),
        (["--mixture_files", str(shards), str(shards / "part-0.txt"),
          "--mixture_weights", "0.5", "0.5"], "is a folder, not a file"),
        (["--mixture_files", str(shards / "part-0.txt"), "--mixture_weights", "0.5", "0.5"],
         "2 weights for 1"),
        (["--tokenized_dir", str(shards / "part-0.txt")], "is a file, not a folder"),
        (["--tokenized_dir", str(tmp_path / "never-pretokenized")], "no such folder"),
    ]
    for args, needle in cases:
        fails([*tiny_args, *args], needle)


@pytest.mark.parametrize("content, name, extra, needle", [
    ("", "train.txt", [], "is empty (0 bytes)"),
    ("\n\n   \n\n", "train.txt", [], "blank lines"),
    ('{"body": "a b c"}\n{"body": "d e f"}\n', "train.jsonl", [], "text_column='text'"),
    ("binary", "train.docx", [], "unsupported or mixed file types"),
    ("not parquet", "train.parquet.gz", [], "Parquet compresses inside the file"),
    ("only one line of text\n", "train.txt", [], "fewer than 2 rows"),
])
def test_unusable_data(fails, tiny_args, tmp_path, content, name, extra, needle):
    train = _write(tmp_path / name, content)
    fails([*tiny_args, "--train_file", train, *extra], needle)


def test_probe_file_mistakes(fails, tiny_args, tmp_path):
    """--probe_file: refused at start, before any model loads, naming the fix."""
    cases = [
        (["--probe_file", str(tmp_path / "none.tsv")], "no such file"),
        (["--probe_file", str(tmp_path)], "is a folder, not a file"),
        (["--probe_file", _write(tmp_path / "p.txt", "a\n")], "not a .csv, .tsv, .jsonl file"),
        (["--probe_file", _write(tmp_path / "p.csv", "sentence,label\nx,a\n")],
         "Fix: pass --probe_text_column"),
        (["--probe_file", _write(tmp_path / "one.csv", "text,label\nx,a\ny,a\n")],
         "a probe needs at least 2 labels"),
        (["--probe_file", _write(tmp_path / "few.csv", "text,label\nx,a\ny,a\nz,b\n")],
         "fewer than the 5 cross-validation folds"),
        (["--probe_file", _write(tmp_path / "x.tsv", "text\tlabel\n"),
          _write(tmp_path / "x.csv", "text,label\n")], "two files named 'x'"),
        (["--probe_file", _write(tmp_path / "good.csv", "text,label\n" + "x,a\ny,b\n" * 5),
          str(tmp_path / "none.tsv")], "no such file"),  # every file checked, not the first
        (["--probe_folds", "1"], "cross-validation needs at least 2 folds"),
        (["--probe_mask_padding", "maybe"], "not a known value"),
        (["--pseudo_perplexity_examples", "-1"], "must be at least 0"),
    ]
    for args, needle in cases:
        fails([*tiny_args, *args], needle)


def test_tokenized_dir_not_written_by_pretokenize(fails, tiny_args, tmp_path):
    folder = tmp_path / "tokenized"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text("{}")
    fails([*tiny_args, "--tokenized_dir", str(folder)], "tokenized_dir=")


# ================================================================================ arguments
@pytest.mark.parametrize("args, needle", [
    (["--lerning_rate", "1e-4"], "did you mean --learning_rate"),
    (["-lr", "1e-4"], "unknown option -lr"),
    (["--learning_rate", "fast"], "pass a number to --learning_rate"),
    (["--max_seq_length", "1.5"], "pass a whole number to --max_seq_length"),
    (["--mask_padding", "maybe"], "pass true or false to --mask_padding"),
    (["--learning_rate"], "give --learning_rate a value"),
    (["--mlm_probability", "1.5"], "must lie strictly between 0 and 1"),
    (["--padding", "sideways"], "not a known value"),
    (["--group_by_length", "--padding", "packed"], "has no effect with --padding packed"),
    (["--config"], "--config needs a path"),
    (["--per_device_train_tokens", "64"], "pass at least --per_device_train_tokens 128"),
    (["--per_device_train_tokens", "0"], "holds less than one example"),
    (["--per_device_train_tokens", "4096", "--per_device_train_batch_size", "8"],
     "the micro-batch is stated once"),
    (["--config", "no/such/config.yaml"], "no such file"),
])
def test_argument_mistakes(fails, tiny_args, args, needle):
    fails([*tiny_args, *args], needle)


def test_a_value_the_shell_split_in_two(fails, tiny_args):
    """A value split by the shell (an unquoted space) leaves a word over, like a glob."""
    fails([*tiny_args, "--run_name", "my", "run"], "unexpected argument(s) 'run'")


def test_yaml_mistakes(fails, tiny_args, tmp_path):
    fails(["--config", _write(tmp_path / "a.yaml", "learning_rate: 1e-4\nzero_stage: 3\n"),
           *tiny_args], "unknown key 'zero_stage'")
    fails(["--config", _write(tmp_path / "b.yaml", "max_seq_length: long\n"), *tiny_args],
          "b.yaml")
    fails(["--config", _write(tmp_path / "c.yaml", "- learning_rate\n- 1e-4\n"), *tiny_args],
          "expected a mapping of key: value pairs, found a list")
    fails(["--config", _write(tmp_path / "d.yaml", "learning_rate: [1e-4\n"), *tiny_args],
          "not readable as YAML")


def test_model_and_config_name_together(fails, tiny_bert_dir, good_model):
    fails(["--model_name_or_path", str(good_model), "--config_name", tiny_bert_dir],
          "given together with model_name_or_path")


# ================================================================================ paths
def test_output_dir_under_a_file(fails, tiny_args, tmp_path):
    file = _write(tmp_path / "file", "x")
    fails([*tiny_args, "--output_dir", f"{file}/run"], "is a file, not a folder",
          out=Path(file))


def test_output_dir_not_writable(fails, tiny_args, tmp_path, monkeypatch):
    from mlmkit.train import runlock
    monkeypatch.setattr(runlock.os, "access", lambda *a, **k: False)  # as for another user's
    fails([*tiny_args, "--output_dir", str(tmp_path / "run")], "is not writable by this user")


def test_output_dir_broken_symlink(fails, tiny_args, tmp_path):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    fails([*tiny_args, "--output_dir", str(link)], "is a broken symbolic link", out=tmp_path)


def test_output_dir_holding_a_finished_run(fails, tiny_args, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    fails([*tiny_args, "--output_dir", str(out)], "holds a finished run", out=out)


def test_output_dir_holding_a_run_with_other_settings(fails, tiny_args, tmp_path):
    from mlmkit.config.parse import parse_config, save_config
    out = tmp_path / "run"
    out.mkdir()
    save_config(parse_config([*tiny_args, "--learning_rate", "1e-3"]), out / "config.yaml")
    fails([*tiny_args, "--output_dir", str(out)], "holds a run with different settings",
          out=out)


def test_output_dir_in_use_by_a_live_run(fails, tiny_args, tmp_path):
    from mlmkit.train import runlock
    out = tmp_path / "run"
    out.mkdir()
    (out / runlock.LOCK_NAME).write_text(json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(), "started": "2025-01-01T00:00:00",
        "boot_id": runlock._boot_id(), "proc_start": runlock._proc_start(os.getpid()),
        "token": "other"}))
    fails([*tiny_args, "--output_dir", str(out)], "is in use by another run", out=out)


def test_resume_from_checkpoint_mistakes(fails, tiny_args, tmp_path):
    file = _write(tmp_path / "state.json", "{}")
    empty = tmp_path / "checkpoint-10"
    empty.mkdir()
    fails([*tiny_args, "--resume_from_checkpoint", str(tmp_path / "checkpoint-5")],
          "no such checkpoint folder")
    fails([*tiny_args, "--resume_from_checkpoint", file], "is a file, not a checkpoint folder")
    fails([*tiny_args, "--resume_from_checkpoint", str(empty)], "is not a complete checkpoint")


# ================================================================================ launch
def test_tracker_package_not_installed(fails, tiny_args):
    if importlib.util.find_spec("trackio"):
        pytest.skip("trackio is installed here")
    fails([*tiny_args, "--report_to", "trackio"], "the trackio package is not installed")


def test_resume_under_another_launch():
    from mlmkit.train.launch import check_launch
    accelerator = SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO")
    saved = {"num_processes": 8, "distributed_type": "DEEPSPEED"}
    assert_user_error(lambda: check_launch(saved, "checkpoint-100", accelerator),
                      "was written by")


# ================================================================================ not the user's
def test_an_internal_error_keeps_its_traceback_and_leaves_nothing_finished(
        recipe, tiny_args, tmp_path, monkeypatch):
    """A bug is not a user's mistake: it propagates (its traceback is printed by Python) and the
    run folder holds no summary.json or model/."""
    from mlmkit.train import loop

    def broken_step(*args, **kwargs):
        raise RuntimeError("a bug in the training step")

    monkeypatch.setattr(loop, "train_step", broken_step)
    out = tmp_path / "run"
    train = _write(tmp_path / "train.txt", "".join(
        f"the quick brown fox number {i} jumps over the lazy dog\n" for i in range(40)))
    args = [*BASE, *tiny_args, "--train_file", train, "--max_seq_length", "32",
            "--eval_pad_sensitivity", "false", "--output_dir", str(out)]
    with pytest.raises(RuntimeError, match="a bug in the training step"):
        run_cli(recipe.main, args)
    assert (out / "config.yaml").exists()  # it failed after the run folder was prepared
    assert not (out / "summary.json").exists() and not (out / "model").exists()


def test_error_line_is_one_line():
    from mlmkit.cli import error_line
    assert error_line(ConfigError("a\n  b. Fix: c.\n")) == "mlmkit: error: a b. Fix: c."

