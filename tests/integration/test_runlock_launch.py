"""One run per output folder, launched for real: two `accelerate launch` commands started at the
same moment into one --output_dir. Exactly one trains; the other stops within seconds with a
one-line error naming the holder (mlmkit.train.runlock), and the winner ends exactly as a run without
the intruder."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time

import pytest
from helpers import kill_tree, run_recipe, start

from mlmkit.train import tracking as M
from mlmkit.train.tracking import read_metrics


def test_two_runs_started_into_one_folder_only_one_trains(tmp_path, tiny_args, capsys):
    args = [*tiny_args, "--max_train_steps", "12", "--max_train_samples", "200",
            "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--max_eval_samples", "32"]
    alone = run_recipe([*args, "--output_dir", tmp_path / "alone"], threads=1)  # no intruder
    reference = alone.result

    out = tmp_path / "shared"
    t0 = time.monotonic()
    runs = [start([*args, "--output_dir", str(out)], stderr=subprocess.PIPE) for _ in range(2)]
    ended = {}
    while len(ended) < 2 and time.monotonic() - t0 < 300:
        for i, run in enumerate(runs):
            if i not in ended and run.poll() is not None:
                ended[i] = time.monotonic() - t0
        time.sleep(0.1)
    for run in runs:
        if run.poll() is None:  # a failure: leave no process behind
            kill_tree(run.pid)
            run.wait()
    outputs = [(run.stdout.read(), run.stderr.read()) for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(code == 0 for code in codes) == [False, True], (codes, outputs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)

    # the intruder: out before loading any data or model (seconds on an idle machine), with
    # one line naming the holder and the fix
    assert ended[loser] < ended[winner] and ended[loser] < 120, ended
    assert "data:" not in outputs[loser][0] and "train:" not in outputs[loser][0]
    errors = [line for line in outputs[loser][1].splitlines() if line.startswith("mlmkit: error:")]
    assert len(errors) == 1, outputs[loser][1][-3000:]
    # the holder is the winner's recipe process (a child of its launcher): host, pid, start time
    assert re.search(rf"pid \d+ on host {re.escape(socket.gethostname())}, started \d{{4}}-",
                     errors[0]), errors[0]
    assert "in use by another run" in errors[0] and "Fix:" in errors[0]

    # the winner: each step logged once, the same result as a run without the intruder
    steps = [r[M.STEP] for r in read_metrics(out) if M.TRAIN_LOSS in r]
    assert steps == list(range(1, 13))
    summary = json.loads((out / "summary.json").read_text())
    assert summary[M.EVAL_LOSS] == pytest.approx(reference[M.EVAL_LOSS], rel=1e-6)
    assert not (out / "run.lock").exists()  # released at exit
    with capsys.disabled():
        print(f"\nintruder: {errors[0]} (exit {codes[loser]} after {ended[loser]:.1f} s; winner "
              f"{ended[winner]:.1f} s)")
