"""A tracker never ends a run: the recipe launched for real with the real W&B (offline here).

* W&B's service (``wandb-core``) SIGKILLed mid-run: one warning line, and the run finishes with
  every step in metrics.jsonl, its checkpoints, its model and summary.json saying what happened.
* W&B online with an API key and no route to the server (a compute node without outbound
  internet): the run starts offline at once, says so and how to `wandb sync`, and trains. What
  that offline run wrote for W&B, read back from its transaction log: the run's name and tags,
  its metrics against train/tokens_seen, and summary.json's numbers in its summary.

How a stop under Accelerate's one-process launcher (which signals W&B's service too) goes:
tests/integration/test_resume.py.
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest
from helpers import finish, launch, recipe_pids, start, wait_for_checkpoint, wandb_records

from mlmkit.train import tracking as M
from mlmkit.train.tracking import read_metrics


@pytest.fixture(scope="module")
def args(tiny_bert_dir, tokenizer_path) -> list[str]:
    return ["--config_name", tiny_bert_dir, "--tokenizer_name", tokenizer_path,
            "--report_to", "wandb", "--progress_bar", "false", "--max_eval_samples", "32",
            "--eval_pad_sensitivity", "false", "--fill_mask_check", "false",
            "--max_train_samples", "64", "--per_device_train_batch_size", "4",
            "--logging_steps", "1", "--eval_steps", "40", "--checkpointing_steps", "5"]


def wandb_core(recipe: int, timeout: float = 60) -> psutil.Process:
    """W&B's service process under the recipe process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(recipe).children(recursive=True):
            if "wandb-core" in " ".join(child.cmdline()) or "wandb-core" in child.name():
                return child
        time.sleep(0.2)
    raise AssertionError("no wandb-core process under the recipe")


def test_wandb_service_killed_mid_run_the_run_finishes(tmp_path, args):
    out = tmp_path / "run"
    proc = start([*args, "--max_train_steps", "120", "--output_dir", str(out)],
                 env={"WANDB_MODE": "offline"})
    recipe = recipe_pids(proc)[0]
    service = wandb_core(recipe)
    killed_after = wait_for_checkpoint(proc, out, 5)
    service.send_signal(signal.SIGKILL)
    output = finish(proc)  # exit status 0, or it raises with the output

    assert "Traceback" not in output, output[-4000:]
    warnings = [line for line in output.splitlines() if "the wandb tracker failed" in line]
    assert len(warnings) == 1, output[-4000:]
    assert "socket.send() raised exception" not in output  # the warning is the one line
    assert "training goes on" in warnings[0] and str(out / "metrics.jsonl") in warnings[0]
    steps = [r[M.STEP] for r in read_metrics(out) if M.TRAIN_LOSS in r]
    assert steps == list(range(1, 121)), "metrics.jsonl lost steps"
    summary = json.loads((out / "summary.json").read_text())
    assert summary[M.STEP] == 120 and (out / "model" / "model.safetensors").is_file()
    failed = summary[M.TRACKERS_RAN]["wandb"]
    assert failed.startswith("failed at step "), failed
    assert int(failed.split()[3]) > killed_after  # the first log after the kill noticed it


def test_wandb_online_without_a_route_goes_offline(tmp_path, args):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567",
           # nothing listens there: no route to the W&B server, as on a node without internet
           "WANDB_BASE_URL": "http://127.0.0.1:9"}
    t0 = time.monotonic()
    proc = launch([*args, "--max_train_steps", "2", "--output_dir", str(out)], env=env)
    seconds = time.monotonic() - t0
    notice = next(line for line in proc.stdout.splitlines() if line.startswith("W&B: "))
    assert "http://127.0.0.1:9 unreachable" in notice and "logging offline" in notice
    assert "wandb sync" in notice
    summary = json.loads((out / "summary.json").read_text())
    assert summary[M.TRACKERS_RAN] == {"wandb": "offline"}
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    print(f"online W&B without a route: the whole launch took {seconds:.0f} s")

    # the x-axes: every record has them, eval records included (the eval at 0, train at 1 and
    # 2, the final eval at 2); rows of 4 per step, packed several examples to a row
    records = read_metrics(out)
    assert [r[M.STEP] for r in records] == [0, 1, 2, 2]
    for axis in (M.TRAIN_EXAMPLES_SEEN, M.TRAIN_TOKENS_SEEN):
        seen = [r[axis] for r in records]
        assert 0 == seen[0] < seen[1] < seen[2] == seen[3] == summary[axis], (axis, seen)
    assert summary[M.TRAIN_EXAMPLES_SEEN] >= 8  # at least one example a row
    # ... and what W&B got: the run named after its folder, tagged, its axes, its summary
    wandb = wandb_records(run_dir)
    (run,) = wandb["run"]
    assert run.display_name == "run"
    assert list(run.tags) == [f"padding:{summary[M.PADDING]}", "model:bert"]
    axes = {m.name or m.glob_name: m.step_metric for m in wandb["metric"]}
    assert axes == {M.TRAIN_TOKENS_SEEN: "", M.TRAIN_EXAMPLES_SEEN: "", M.STEP: "",
                    "*": M.TRAIN_TOKENS_SEEN}
    got = {}  # W&B's summary: its updates, the last one wins
    for item in (i for update in wandb["summary"] for i in update.update):
        got[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    for key in (M.FIRST_EVAL_LOSS, M.FIRST_EVAL_PERPLEXITY, M.EVAL_LOSS, M.EVAL_PERPLEXITY,
                M.TRAIN_RUNTIME, M.TRAIN_TOKENS_SEEN, M.TRAIN_EXAMPLES_SEEN, M.STEP, M.PADDING):
        assert got[key] == summary[key], key

