"""PyTorch FSDP2 (accelerate_configs/fsdp2.yaml) on 2 CPU processes with gloo: the same per-step
losses as one process, sharded checkpoints inside the atomic checkpoint scheme, an exact resume
after SIGKILL, and a consolidated model/ that re-evaluates to the run's final eval loss. The runs
train with --optimizer stable_adamw: its per-tensor clipping on sharded weights matches one
process, and its state (the step count in its parameter groups included) resumes through DCP.
(FSDP2's layer units: tests/unit/config/test_launch.py.)"""

from __future__ import annotations

import json

import pytest
from helpers import (
    assert_same_run,
    complete_checkpoints,
    exported_eval_loss,
    finish,
    kill_tree,
    launch,
    run_recipe,
    start,
    train_losses,
    wait_for_checkpoint,
)
from readme_commands import accelerate_args, accelerate_launch

from mlmkit.data.probe_sets import main as probe_sets
from mlmkit.train import tracking as M

# The README's line, with its CPU note: --config_file accelerate_configs/fsdp2.yaml
# --num_processes 2 --mixed_precision no
FSDP2 = accelerate_args(accelerate_launch("fsdp2"))
STEPS = 16


@pytest.fixture(scope="module")
def args(tiny_args) -> list[str]:
    """16 steps of a global batch of 8 (fp32, no dropout), a log line and a checkpoint every 2;
    the fill-mask check on (it reads model/ after FSDP2 training, and a resumed run takes the
    initial model's predictions from the checkpoint); the final weights averaged with the
    sharded checkpoint-14 (model_avg/); StableAdamW (fused AdamW: the DDP and ZeRO launches of
    test_distributed.py)."""
    return [*tiny_args, "--max_train_steps", str(STEPS), "--logging_steps", "1",
            "--optimizer", "stable_adamw",
            "--learning_rate", "3e-3", "--max_train_samples", "200", "--padding", "longest",
            "--checkpointing_steps", "2", "--save_total_limit", "2", "--fill_mask_check", "true",
            "--average_checkpoints", "2"]


def downstream(root) -> list[str]:
    """The downstream probe (both arms) and the pseudo-perplexity, on root/docs.tsv."""
    return ["--probe_file", str(root / "docs.tsv"), "--probe_folds", "3",
            "--probe_mask_padding", "both", "--pseudo_perplexity_examples", "8"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, args):
    """(the uninterrupted FSDP2 run of 2 processes x 4 examples, its output, one process x 8):
    the launch, and the one-process run in this process while it runs; both with the
    downstream probe (both arms) and the pseudo-perplexity, which every process takes part in."""
    root = tmp_path_factory.mktemp("fsdp")
    probe_sets(["docs", str(root), "--max_examples", "600"])
    proc = start([*args, *downstream(root), "--per_device_train_batch_size", "4", "--output_dir",
                  str(root / "fsdp2")], FSDP2)
    try:
        run_recipe([*args, *downstream(root), "--per_device_train_batch_size", "8", "--output_dir",
                    root / "one", "--fill_mask_check", "false"], threads=1)  # the other core
    except BaseException:
        kill_tree(proc)
        raise
    return root / "fsdp2", finish(proc), root / "one"


def test_fsdp2_matches_one_process_and_exports_the_trained_weights(fsdp_run):
    out, stdout, one = fsdp_run
    assert "x 2 processes" in stdout
    losses, reference = train_losses(out), train_losses(one)
    assert len(reference) == len(losses) == STEPS
    for a, b in zip(reference, losses, strict=True):
        assert abs(a - b) / abs(a) <= 1e-4, (reference, losses)
    assert abs(reference[-1] - reference[0]) > 1e-3  # training moved: the comparison has teeth

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary[M.STEP] == STEPS
    assert summary[M.EVAL_LOSS] < summary["first/" + M.EVAL_LOSS]
    # model/ is one consolidated HF checkpoint (gathered from the shards), its decoder still tied
    # to the word embeddings, and it re-evaluates to the engine's final eval loss
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(out / "model")
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert sorted(p.name for p in (out / "model").glob("*.safetensors")) == ["model.safetensors"]
    assert exported_eval_loss(out) == pytest.approx(summary[M.EVAL_LOSS], rel=1e-5)
    # model_avg/: the final weights and the sharded checkpoint-14 (consolidated), re-evaluated
    # to the run's eval/avg_loss, as the one-process run's
    assert summary[M.AVERAGED_CHECKPOINTS] == [STEPS - 2, STEPS]
    assert exported_eval_loss(out, "model_avg") == pytest.approx(summary[M.EVAL_AVG_LOSS],
                                                                 rel=1e-5)
    one_summary = json.loads((one / "summary.json").read_text())
    assert one_summary[M.EVAL_AVG_LOSS] == pytest.approx(summary[M.EVAL_AVG_LOSS], rel=1e-4)
    # the downstream measures: the two processes' shares of the forwards give one process's
    for key in (M.FIRST_EVAL_PSEUDO_PERPLEXITY, M.EVAL_PSEUDO_PERPLEXITY):
        assert summary[key] == pytest.approx(one_summary[key], rel=1e-4), key
    for key in (M.FIRST_EVAL_PROBE_ACCURACY, M.FIRST_EVAL_PROBE_ACCURACY_UNMASKED,
                M.EVAL_PROBE_ACCURACY, M.EVAL_PROBE_ACCURACY_UNMASKED):
        assert summary[key] == pytest.approx(one_summary[key], abs=0.01), key
    # the fill-mask check ran on model/ after FSDP2 training
    assert len(summary["fill_mask"]) == 3

    # checkpoints: each process's shard of the model and of the optimizer, all in the manifest
    ckpt = out / "checkpoints" / f"checkpoint-{STEPS}"
    manifest = json.loads((ckpt / "COMPLETE").read_text())["files"]
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {f"{part}/__0_0.distcp", f"{part}/__1_0.distcp", f"{part}/.metadata"} <= set(manifest)
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= set(manifest)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["launch"] == {"num_processes": 2, "distributed_type": "FSDP"}


def test_fsdp2_sigkill_then_resume_is_exact(tmp_path, args, fsdp_run):
    reference, _, _ = fsdp_run
    out = tmp_path / "run"
    cmd = [*args, *downstream(reference.parent), "--per_device_train_batch_size", "4",
           "--output_dir", str(out)]
    proc = start(cmd, FSDP2)
    wait_for_checkpoint(proc, out, 2)
    kill_tree(proc)
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    resumed_from = complete_checkpoints(out)[-1]
    assert resumed_from < STEPS

    proc = launch(cmd, accelerate_args=FSDP2)
    assert f"checkpoint-{resumed_from} (step {resumed_from}" in proc.stdout
    assert_same_run(out, reference)  # bit-identical: weights, metrics.jsonl, final eval
    summary = json.loads((out / "summary.json").read_text())
    ref = json.loads((reference / "summary.json").read_text())
    assert [e["rank_before"] for e in summary["fill_mask"]] == \
        [e["rank_before"] for e in ref["fill_mask"]]  # the initial model's check, from the state
