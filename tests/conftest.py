"""Shared fixtures: the embedded tokenizer, tiny BERTs built from a config, and the recipe flags
of a fast run. Shared helpers (launching, in-process runs, tiny models...) are in helpers.py.

Where a test goes: tests/unit/<stage>/test_<module>.py for src/mlmkit/<stage>/<module>.py (the
package's layout, mirrored); tests/unit/ itself for what spans the package (the recipes run in
this process: test_recipe.py, test_ablate.py; user errors; the docs; the lock);
tests/integration/ only for tests that launch processes (marked ``integration``). Tests of the Slurm script submit to a real
Slurm cluster on this machine (the ``slurm_cluster`` fixture, tests/slurm_cluster.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, SENTENCES, tiny_config_dir

# `make test` runs the suite on every core (pytest-xdist, --dist loadscope): a test module is one
# unit of work, so its module fixtures are built once, and each worker runs one intra-op thread.
# Launches of several processes need no lock: the single-node accelerate configs take a free
# port (`main_process_port: 0`), and launches that name a port take a free one
# (helpers.free_port).


def pytest_configure(config):
    """Under `make test`'s workers, one intra-op thread each, as every launched process runs:
    the workers are the parallelism, and more threads than cores only spin."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)


# The modules that spend longest waiting (Slurm's time checks, signals, checkpoints to appear) go
# first, so `make test`'s workers fill those waits with the rest instead of ending on them.
WAIT_FIRST = ("test_slurm.py", "test_readme_launches.py", "test_resume.py",
              "test_streaming_launch.py", "test_ablation.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)
    rank = {name: i for i, name in enumerate(WAIT_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real Slurm cluster on this machine for the session: munged, slurmctld and two slurmd
    (node1, node2: 2 CPUs each, both on 127.0.0.1), all in a temporary folder
    (tests/slurm_cluster.py); stopped afterwards with every process it ran. Slurm not installed:
    the test is skipped with the command that installs it (`make test` runs it as root) -- but
    fails under CI=true, where a skipped Slurm test would hide a broken setup."""
    from slurm_cluster import INSTALL, SlurmCluster, missing
    why = None
    if missing():
        why = f"Slurm is not installed ({', '.join(missing())} missing): {INSTALL}"
    elif os.geteuid() != 0:
        why = "the test Slurm cluster's daemons run as root (slurmd starts the jobs): run as root"
    if why:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{why} (CI=true: a missing Slurm is a failure)")
        pytest.skip(why)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    """The embedded model's tokenizer; MLMKIT_TEST_TOKENIZER names another folder (a GPU machine
    without the embedded model package: .gpu/tok)."""
    if os.environ.get("MLMKIT_TEST_TOKENIZER"):
        return os.environ["MLMKIT_TEST_TOKENIZER"]
    from mlmkit.model.checks import embedded_model_path
    return str(embedded_model_path())


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture(scope="session")
def text_examples(tokenizer) -> list[list[int]]:
    """helpers.SENTENCES tokenized: words of several WordPiece pieces, lengths 5 to 20."""
    return [tokenizer(s)["input_ids"] for s in SENTENCES]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """The config of a tiny BERT without dropout (``--config_name``)."""
    return tiny_config_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_weights(tmp_path_factory) -> str:
    """The tiny BERT's weights, saved (``--model_name_or_path``): runs compared across engines
    start from them, as ZeRO-3 initialises a model it builds from a config differently (already
    sharded)."""
    from helpers import tiny_model
    folder = tmp_path_factory.mktemp("tiny_bert_weights")
    tiny_model("bert").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert_dropout_dir(tmp_path_factory) -> str:
    """The tiny BERT with dropout 0.1: equal results of two runs need every RNG restored."""
    return tiny_config_dir(tmp_path_factory.mktemp("tiny_bert_dropout"), hidden_dropout_prob=0.1)


@pytest.fixture(scope="session")
def tiny_args(tiny_bert_dir, tokenizer_path) -> list[str]:
    """Recipe flags for a fast run on the tiny BERT and a slice of the embedded corpus, without
    the fill-mask check and the pad-sensitivity probe (a test that asserts on them turns them
    on: later flags win)."""
    return ["--config_name", tiny_bert_dir, "--tokenizer_name", tokenizer_path,
            "--report_to", "none", "--progress_bar", "false", "--max_eval_samples", "64",
            "--per_device_eval_batch_size", "32", "--logging_steps", "2",
            "--fill_mask_check", "false", "--eval_pad_sensitivity", "false"]


@pytest.fixture
def ablation_yaml(tmp_path, tiny_bert_dir, tokenizer_path):
    """An ablation YAML for recipes/ablate.py: two real padding arms on the tiny BERT (W&B
    offline) and one that fails at run time (empty corpus: a DataError in the recipe)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    spec = {
        "name": "abl-test",
        "output_dir": str(tmp_path / "abl"),
        "accelerate_config": str(ROOT / "accelerate_configs" / "cpu.yaml"),
        "seeds": 1,
        "recipe": {"config_name": tiny_bert_dir, "tokenizer_name": tokenizer_path,
                   "max_train_samples": 200, "max_eval_samples": 64,
                   "per_device_eval_batch_size": 32, "max_train_steps": 4, "eval_steps": 2,
                   "logging_steps": 2, "learning_rate": 3e-3, "report_to": "wandb",
                   "progress_bar": False, "fill_mask_check": False},
        "arms": {"masked": {"padding": "longest", "mask_padding": True},
                 "unmasked": {"padding": "longest", "mask_padding": False},
                 "broken": {"train_file": str(empty)}},
    }
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
