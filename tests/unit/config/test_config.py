import pytest
import yaml

from mlmkit.config.errors import ConfigError
from mlmkit.config.fields import MLMConfig, differences
from mlmkit.config.parse import parse_config, save_config
from mlmkit.config.validation import validate_config


def test_defaults_yaml_and_cli_precedence(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("learning_rate: 2.0e-4\nline_by_line: false\nwandb_tags: [a, b]\nseed: 7\n")
    cfg = parse_config(["--config", str(file), "--seed", "9"])
    assert cfg.learning_rate == 2e-4 and cfg.line_by_line is False
    assert cfg.wandb_tags == ["a", "b"]
    assert cfg.seed == 9  # command line wins over the file
    assert parse_config([]).mlm_probability == 0.15


def test_bool_flags_follow_hf_style():
    assert parse_config(["--mask_padding", "false"]).mask_padding is False
    assert parse_config(["--group_by_length"]).group_by_length is True


@pytest.mark.parametrize("argv, needle", [
    (["--learning_rate", "fast"], "learning_rate"),
    (["--lerning_rate", "1"], "did you mean --learning_rate"),
    (["--mlm_probability", "0"], "mlm_probability"),
    (["--mlm_probability", "1"], "mlm_probability"),
    (["--eval_mlm_probability", "0"], "eval_mlm_probability"),
    (["--eval_mlm_probability", "1.5"], "eval_mlm_probability"),
    (["--decay_ratio", "1.5"], "decay_ratio"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    (["--gradient_accumulation_steps", "-1"], "gradient_accumulation_steps"),
    (["--padding", "sideways"], "padding"),
    (["--train_file", "/no/such/file.txt"], "train_file"),
    (["--mask_replace_prob", "0.9", "--random_replace_prob", "0.2"], "random_replace_prob"),
    (["--dataset_name", "x", "--train_file", __file__], "dataset_name"),
    (["--report_to", "slack"], "report_to"),
    (["--mlm_probability_final", "1"], "mlm_probability_final="),
    (["--seq_len_warmup_steps", "10"], "seq_len_warmup_start=None: must lie in 1..127"),
    (["--seq_len_warmup_steps", "10", "--seq_len_warmup_start", "128"], "must lie in 1..127"),
    (["--seq_len_warmup_start", "32"], "has no effect without --seq_len_warmup_steps"),
    (["--seq_len_warmup_steps", "10", "--seq_len_warmup_start", "32", "--padding",
      "max_length"], "Fix: use --padding longest or packed"),
    (["--batch_warmup_steps", "-1"], "batch_warmup_steps=-1: must be at least 0"),
])


def test_bad_values_name_the_key(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert needle in str(err.value)


def test_yaml_errors_name_the_file_and_key(tmp_path):
    unknown = tmp_path / "u.yaml"
    unknown.write_text("learnign_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"u\.yaml: unknown key 'learnign_rate'.*learning_rate"):
        parse_config(["--config", str(unknown)])
    wrong_type = tmp_path / "t.yaml"
    wrong_type.write_text("max_seq_length: long\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: .*max_seq_length"):
        parse_config(["--config", str(wrong_type)])
    with pytest.raises(ConfigError, match="no such file"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_config(["--learning_rate", "3e-4", "--wandb_tags", "x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = parse_config(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["learning_rate"] == 3e-4


def test_recipe_yamls_parse():
    from pathlib import Path
    files = sorted((Path(__file__).parents[3] / "recipes" / "configs").glob("*.yaml"))
    recipe_files = [f for f in files if not f.name.startswith("ablation_")]  # runner configs
    assert recipe_files
    for file in recipe_files:
        parse_config(["--config", str(file)])


def test_default_yaml_spells_out_the_real_defaults():
    from pathlib import Path
    file = Path(__file__).parents[3] / "recipes" / "configs" / "default.yaml"
    assert parse_config(["--config", str(file)]) == parse_config([])


def test_bookkeeping_and_per_run_keys_are_pinned():
    from mlmkit.config.fields import BOOKKEEPING_KEYS, PER_RUN_KEYS
    assert BOOKKEEPING_KEYS == {
        "checkpointing_steps", "data_cache_per_node", "dataloader_num_workers", "ddp_timeout",
        "eval_pad_sensitivity", "eval_steps", "fill_mask_check", "logging_steps", "output_dir",
        "overwrite_cache", "overwrite_output_dir", "peak_tflops", "preprocessing_num_workers",
        "probe_file", "probe_folds", "probe_label_column", "probe_mask_padding",
        "probe_text_column", "progress_bar", "pseudo_perplexity_examples", "report_to",
        "resume_from_checkpoint", "run_name", "save_total_limit", "skip_nonfinite_steps",
        "wandb_group", "wandb_project", "wandb_tags"}
    assert PER_RUN_KEYS == {"output_dir", "overwrite_output_dir", "resume_from_checkpoint",
                            "run_name", "seed", "wandb_tags"}


def test_parser_hook_into_hf_argparser_still_works():
    """_Parser overrides HfArgumentParser._parse_dataclass_field (private) to keep mlmkit's own
    metadata away from argparse: fails if a transformers upgrade renames or reshapes it."""
    import dataclasses

    from transformers import HfArgumentParser

    from mlmkit.config.fields import FIELDS, MLMConfig
    from mlmkit.config.parse import _Parser

    assert callable(getattr(HfArgumentParser, "_parse_dataclass_field", None))
    seen = []

    class Counting(_Parser):
        @staticmethod
        def _parse_dataclass_field(parser, field):
            seen.append(field.name)
            _Parser._parse_dataclass_field(parser, field)

    parser = Counting(MLMConfig)
    assert seen == [f.name for f in dataclasses.fields(MLMConfig)]  # called once per field
    for action in parser._actions:
        assert not hasattr(action, "bookkeeping") and not hasattr(action, "per_run")
    help_text = " ".join(_Parser(MLMConfig).format_help().split())  # unwrapped
    assert "Column holding the text." in help_text
    assert all(f"--{key}" in help_text for key in FIELDS)
    # bookkeeping / per_run fields parse like any other
    (cfg,) = _Parser(MLMConfig).parse_args_into_dataclasses(
        args=["--logging_steps", "5", "--seed", "3", "--wandb_tags", "a", "b"])
    assert (cfg.logging_steps, cfg.seed, cfg.wandb_tags) == (5, 3, ["a", "b"])


def test_every_field_has_help_and_mlmkit_metadata():
    import dataclasses

    from mlmkit.config.fields import MLMConfig
    for f in dataclasses.fields(MLMConfig):  # one idiom: field(..., metadata=_meta(help, ...))
        assert f.metadata.get("help"), f.name
        assert set(f.metadata) == {"help", "bookkeeping", "per_run"}, f.name


def test_run_shape_defaults_follow_the_device_and_the_padding():
    from mlmkit.config.fields import MLMConfig
    from mlmkit.config.shape import RunShape, run_shape
    cfg = MLMConfig(per_device_train_batch_size=8, gradient_accumulation_steps=4)
    assert run_shape(cfg, num_processes=2, on_gpu=True, padding="longest") == RunShape(
        workers=2, pad_to_multiple_of=None, positions_multiple=None, global_batch_size=64,
        unit="examples", micro_batch_size=8, micro_batch_tokens=None)
    cpu = run_shape(cfg, num_processes=1, on_gpu=False, padding="packed")
    assert (cpu.workers, cpu.global_batch_size, cpu.unit) == (0, 32, "rows")


@pytest.mark.parametrize("flags, on_gpu, expected", [
    (dict(dataloader_num_workers=3), False, 3),  # explicit wins over the device default
    (dict(dataloader_num_workers=0), True, 0),
    (dict(streaming=True), True, 1),  # a stream is read by one worker at most
    (dict(streaming=True), False, 0),
    (dict(streaming=True, dataloader_num_workers=4), True, 1),
])


def test_run_shape_workers(flags, on_gpu, expected):
    from mlmkit.config.fields import MLMConfig
    from mlmkit.config.shape import run_shape
    shape = run_shape(MLMConfig(**flags), num_processes=1, on_gpu=on_gpu, padding="longest")
    assert shape.workers == expected


@pytest.mark.parametrize("flags, padding, pad_multiple, positions_multiple", [
    (dict(pad_to_multiple_of=8), "packed", 8, None),
    (dict(pad_to_multiple_of=8, torch_compile=True), "packed", 128, None),  # fixed width
    (dict(pad_to_multiple_of=8, torch_compile=True), "longest", 8, None),
    (dict(torch_compile=True, torch_compile_mode="reduce-overhead"), "packed", 128, 256),
    (dict(torch_compile=True, torch_compile_mode="max-autotune"), "longest", None, 256),  # graphs
    (dict(torch_compile=True, torch_compile_mode="max-autotune-no-cudagraphs"), "longest", None,
     None),
    (dict(torch_compile_mode="reduce-overhead"), "longest", None, None),  # not compiled: eager
])


def test_run_shape_compile_widths(flags, padding, pad_multiple, positions_multiple):
    from mlmkit.config.fields import MLMConfig
    from mlmkit.config.shape import run_shape
    shape = run_shape(MLMConfig(**flags), num_processes=1, on_gpu=True, padding=padding)
    assert (shape.pad_to_multiple_of, shape.positions_multiple) == (pad_multiple,
                                                                    positions_multiple)


def test_stray_words_are_a_config_error_that_names_them(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("one line\n")
    # an unquoted glob the shell expanded: --train_file a.txt b.parquet
    with pytest.raises(ConfigError) as err:
        parse_config(["--train_file", str(data), "b.parquet", "--seed", "1"])
    message = str(err.value)
    assert message.startswith("unexpected argument(s) 'b.parquet' (not a --flag")
    assert "quote globs" in message and "--train_file 'data/*.parquet'" in message
    with pytest.raises(ConfigError, match=r"unexpected argument\(s\) 'x', '-5'"):
        parse_config(["x", "--seed", "1", "-5"])
    with pytest.raises(ConfigError, match=r"unknown option -learning_rate\. .*--learning_rate"):
        parse_config(["-learning_rate", "1e-4"])
    listed = tmp_path / "l.yaml"  # several values for a one-value key, in a file
    listed.write_text(f"train_file: [{data}, b.parquet]\n")
    with pytest.raises(ConfigError, match=r"l\.yaml: unexpected argument\(s\) 'b\.parquet'"):
        parse_config(["--config", str(listed)])


def test_config_differences_ignore_keys_that_do_not_change_results():
    base = MLMConfig().to_dict()
    same = {**base, "logging_steps": 99, "report_to": "none", "run_name": "x", "wandb_tags": ["a"],
            "checkpointing_steps": 7, "save_total_limit": 1, "resume_from_checkpoint": "none",
            "overwrite_output_dir": True, "progress_bar": False, "eval_steps": 3}
    assert differences(base, same) == []
    diffs = differences(base, {**base, "learning_rate": 1e-3, "seed": 1})
    assert len(diffs) == 2 and diffs[0].startswith("learning_rate: 5e-05 there, 0.001 now")
    # a key an older mlmkit did not write counts as its default
    old = {k: v for k, v in base.items() if k != "whole_word_mask"}
    assert differences(old, base) == []
    assert "whole_word_mask" in differences(old, {**base, "whole_word_mask": True})[0]


# ------------------------------------------------------------------------------ token budgets
@pytest.mark.parametrize("tokens", ["0", "-512", "127"])
def test_a_token_budget_below_one_row_is_refused_naming_the_fix(tokens):
    with pytest.raises(ConfigError) as err:
        parse_config(["--per_device_train_tokens", tokens, "--max_seq_length", "128"])
    message = str(err.value)
    assert message.startswith(f"per_device_train_tokens={int(tokens)}:") and "\n" not in message
    assert "Fix: pass at least --per_device_train_tokens 128" in message


def test_the_micro_batch_is_stated_once_per_level(tmp_path):
    both = ["--per_device_train_tokens", "4096", "--per_device_train_batch_size", "8"]
    with pytest.raises(ConfigError, match="both given on the command line.*Fix: keep"):
        parse_config(both)
    file = tmp_path / "c.yaml"
    file.write_text("per_device_train_tokens: 4096\nper_device_train_batch_size: 8\n")
    with pytest.raises(ConfigError, match="both given on the --config file"):
        parse_config(["--config", str(file)])
    # the command line overrides the file, as for every key
    file.write_text("per_device_train_tokens: 4096\n")
    cfg = parse_config(["--config", str(file), "--per_device_train_batch_size", "8"])
    assert (cfg.per_device_train_tokens, cfg.per_device_train_batch_size) == (None, 8)
    file.write_text("per_device_train_batch_size: 8\n")
    cfg = parse_config(["--config", str(file), "--per_device_train_tokens", "4096"])
    assert cfg.per_device_train_tokens == 4096


@pytest.mark.parametrize("flags, padding, micro, budget", [
    (dict(), "packed", 16, None),                                       # the batch size as before
    (dict(per_device_train_tokens=4096), "packed", 32, None),          # 4096 // 128 rows
    (dict(per_device_train_tokens=4100), "packed", 32, None),
    (dict(per_device_train_tokens=4096), "longest", 32, 4096),         # the plan fills to 4096
    (dict(per_device_train_tokens=4096), "max_length", 32, None),      # width fixed at 128
    (dict(per_device_train_tokens=4096, streaming=True, max_train_steps=5), "longest", 32, None),
])
def test_run_shape_reads_the_token_budget(flags, padding, micro, budget):
    from mlmkit.config.shape import run_shape
    shape = run_shape(validate_config(MLMConfig(**flags)), num_processes=2, on_gpu=True,
                      padding=padding)
    assert (shape.micro_batch_size, shape.micro_batch_tokens) == (micro, budget)
    assert shape.global_batch_size == micro * 2
