"""Masked-language-model fine-tuning, from one CPU to many GPU nodes.

    accelerate launch recipes/mlm.py                                   # embedded default, offline
    accelerate launch recipes/mlm.py --config recipes/configs/default.yaml --learning_rate 1e-4
    accelerate launch --config_file accelerate_configs/zero3.yaml recipes/mlm.py ...

Every batch carries an attention mask built from example lengths; padding and special tokens are
never MLM targets; the loss is the mean over the masked tokens of the whole global batch. Launch
settings (processes, nodes, ZeRO stage, mixed precision) come from `accelerate launch`, never from
the recipe config. `--mask_padding false` withholds the mask from the model: the padding
ablation's unmasked arm, not something to train with.

Outputs in --output_dir: config.yaml, metrics.jsonl, summary.json, model/ (HF format), and
checkpoints/checkpoint-<step>/ every --checkpointing_steps (the newest --save_total_limit kept);
with --average_checkpoints K, model_avg/ (the final weights and K-1 checkpoints averaged).

Kill it anywhere and run the same command again: it resumes from the newest complete checkpoint
(--resume_from_checkpoint auto) to the same result. SIGTERM/SIGINT stop it cleanly: every process
finishes the current step, a checkpoint is saved, and it exits with status 0 without summary.json
or model/ (recipes/slurm/mlm.sbatch then requeues the job, which reruns the same command); see
mlmkit/train/preemption.py for what each launcher does with the signal.
How a run flows and which module keeps which contract: docs/design.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if SRC.is_dir() and str(SRC) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(SRC))

from mlmkit.config.fields import MLMConfig  # noqa: E402
from mlmkit.config.parse import parse_config  # noqa: E402
from mlmkit.data.probe_file import load_probe_sets  # noqa: E402
from mlmkit.train import tracking as M  # noqa: E402  (metric names)
from mlmkit.train.rundir import check_output_dir, prepare_output_dir  # noqa: E402
from mlmkit.train.runfolder import RunFolder  # noqa: E402
from mlmkit.train.runlock import lock_output_dir  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    # ============================================================================ config
    # Everything that can be wrong with the config fails here, before any model loads.
    cfg: MLMConfig = parse_config(sys.argv[1:] if argv is None else argv)
    trackers = M.check_trackers(cfg.report_to)  # a missing tracker package is a ConfigError
    # One run per output folder: a live holder -> ConfigError naming it. Released when the run
    # ends, however it ends (at interpreter exit at the latest).
    run_lock = lock_output_dir(cfg.output_dir)  # main process only
    if run_lock is not None and run_lock.warning:
        print(f"mlmkit: warning: {run_lock.warning}", file=sys.stderr)
    try:
        return run(cfg, trackers)
    finally:
        if run_lock is not None:
            run_lock.release()


def run(cfg: MLMConfig, trackers: list[str]) -> dict:
    """One run, start to finish, in the folder this process holds the lock of."""
    folder = RunFolder(cfg.output_dir)
    resume = check_output_dir(cfg)  # a finished run or other settings -> ConfigError
    probe_sets = load_probe_sets(cfg)  # --probe_file: their columns and labels -> DataError
    # Heavy imports after validation: a bad flag fails in a second, not after loading torch libs.
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from mlmkit.data.run import load_run_data
    from mlmkit.model import checks, flops, loading, probe
    from mlmkit.train import average, checkpoint, evaluation, fill_mask, launch, loop, preemption
    from mlmkit.train.metrics import build_summary
    from mlmkit.train.optim import prepare_training
    from mlmkit.train.steps import RunSteps

    # ============================================================================ accelerator
    accelerator = launch.build_accelerator(cfg, trackers)  # what `accelerate launch` set up
    log = M.main_print(accelerator)  # each line once per job, not once per node
    rank, world = accelerator.process_index, accelerator.num_processes
    if note := launch.zero_note(accelerator):  # ZeRO on one GPU: only its cost
        log(f"note: {note}")
    if resume.state is not None:  # same processes and engine as the checkpoint's
        launch.check_launch(resume.state.launch, resume.checkpoint, accelerator)
    # Same seed on every process while the model is built (a new MLM head must be identical on
    # all ranks, ZeRO-3 included); per-process seeds for dropout afterwards.
    set_seed(cfg.seed)

    # ============================================================================ data + model
    tokenizer = checks.load_tokenizer(cfg)
    run_data = load_run_data(cfg, tokenizer, accelerator)  # main process tokenizes first
    log("\n".join(run_data.log_lines(cfg)))
    training = prepare_training(cfg, accelerator, loading.load_model(
        cfg, tokenizer, log, device=accelerator.device))
    peak_tflops = flops.device_peak_tflops(accelerator, cfg.peak_tflops)

    # ============================================================================ isolation probe
    # On the model in hand (every process, same forwards): is padding under the mask, and are
    # packed neighbours, invisible to each example? A mode that is not is refused here, before
    # anything is written to output_dir.
    decision = probe.decide_padding(cfg, training, tokenizer, accelerator.device)
    log("\n".join(decision.lines))

    # ============================================================================ run folder
    if accelerator.is_main_process:  # wipe (--overwrite_output_dir), cut metrics.jsonl back
        prepare_output_dir(cfg, resume)
    for warning in resume.warnings:
        log(f"warning: {warning}")
    accelerator.wait_for_everyone()

    # ============================================================================ batches, schedule
    # Shape, train collator, plan and length, LR scheduler: one assembly (the benchmarks' too).
    steps = RunSteps.build(cfg, accelerator, training, tokenizer, run_data,
                           padding=decision.padding)
    schedule = steps.schedule
    average.check_schedule(cfg, schedule.max_steps)  # --average_checkpoints: enough saved
    # The scheduler is built on the prepared optimizer (ZeRO-3 regroups parameters) and stepped
    # by us, once per optimizer step; not handed to prepare(), which would step it per process.
    accelerator.register_for_checkpointing(steps.scheduler)
    set_seed(cfg.seed, device_specific=True)

    # ============================================================================ trackers, resume
    ts = resume.state or checkpoint.TrainState(launch=launch.launch_signature(accelerator))
    metrics_log = M.start_tracking(accelerator, cfg, trackers, ts, {  # + the run's name, tags
        **decision.run_config(), "model_type": training.inner.model.config.model_type})
    log(schedule.describe(cfg, steps.shape, decision.padding, training.inner.sparse_prediction,
                          world))
    for probe_set in probe_sets:
        log(probe_set.describe())
    evaluate = evaluation.Evaluator(accelerator, training, run_data.validation, tokenizer, cfg,
                                    metrics_log, probe_sets=probe_sets)  # + downstream.py
    # Last before the loop: load_state restores every process's RNG as it was at the save.
    if resume.checkpoint is not None:
        checkpoint.load_checkpoint(accelerator, resume.checkpoint)
        log(f"resuming from {resume.checkpoint} (step {ts.step}; {schedule.where(ts)})")
    rank_state = checkpoint.RankState.load(cfg, resume.checkpoint, rank)  # stream position, ...
    ts.first_eval = ts.first_eval or evaluate(0)
    fill_check = fill_mask.FillMaskCheck(cfg.fill_mask_check, tokenizer, run_data.validation)
    fill_check.before(accelerator, training.module, folder.model_initial, ts)

    # ============================================================================ train
    # Steps are prepared (collated, counted, pinned) ahead by workers; the step itself never
    # waits for the device: its results are read in one transfer at log/eval/checkpoint steps.
    prefetcher = steps.prefetcher(rank_state.start(ts))  # where this process's data stands
    stopper = preemption.StopSignal().install()  # SIGTERM/SIGINT: checkpoint, then stop
    progress = tqdm(total=schedule.max_steps, initial=ts.step, desc="train",
                    disable=not (accelerator.is_main_process and cfg.progress_bar))
    stepper = loop.Stepper(accelerator, training, steps.scheduler, cfg, ts)  # + its busy clock
    stop, saved = False, None
    training.module.train()
    try:
        while not stop and ts.step < schedule.max_steps:
            t0 = time.perf_counter()
            try:
                prepared, waited = prefetcher.next()
            except StopIteration:
                break
            for stats in (ts.window, ts.total):
                stats.add_data(prepared.computed, prepared.real, prepared.flops, waited)
            rank_state.update(prepared)
            if line := stepper(prepared, t0):  # a compiled run's warm-up: its time
                log(line)
            ts.advance(prepared)
            progress.update(1)
            logs = ts.step % cfg.logging_steps == 0 or ts.step == schedule.max_steps
            evals = cfg.eval_steps and ts.step % cfg.eval_steps == 0 and ts.step < schedule.max_steps
            saves = bool(cfg.checkpointing_steps) and ts.step % cfg.checkpointing_steps == 0
            stop = stopper.agreed(accelerator)  # after a signal, every process stops here
            if logs or evals or saves or stop:  # the one read of the steps' device results
                stepper.read()
            if stop:  # the checkpoint first: no tracker call before it (a launcher may kill soon)
                metrics_log.hold()
            if logs:
                metrics = stepper.window_metrics(epoch=schedule.epoch_at(ts.step, prepared.epoch),
                                                 num_processes=world, peak_tflops=peak_tflops)
                metrics.update(prepared.scheduled)  # the newest step's mask rate, length, batch
                metrics_log.log(metrics, ts.step)
                progress.set_postfix(loss=f"{metrics[M.TRAIN_LOSS]:.3f}",
                                     tok_s=f"{metrics[M.TRAIN_REAL_TOKENS_PER_S]:.0f}")
            if evals:
                evaluate(ts.step)
                stepper.clock.recalibrate()
            if saves or stop:
                t_save = time.perf_counter()
                saved = checkpoint.save_checkpoint(accelerator, cfg, ts, rank_state.to_dict())
                t_save = time.perf_counter() - t_save
                if saves and not stop:
                    stopper.warn_if_stop_outlasts_launcher(t_save, log)
    finally:
        prefetcher.close()
    stepper.read()
    progress.close()
    stopper.restore()  # signals are handled between training steps only
    if stop:  # pre-empted: not finished, so no summary.json and no model/
        log(f"stopped by {stopper.received or 'a signal to another process'} after step "
            f"{ts.step} of {schedule.max_steps}; saved {saved} in {t_save:.1f} s. To resume, "
            "run the same command again (--resume_from_checkpoint auto finds the newest "
            "checkpoint).")
        metrics_log.finish()  # the held records, then the trackers' end: never an error
        accelerator.end_training()
        return {"stopped": True, M.STEP: ts.step, "checkpoint": str(saved)}

    # ============================================================================ final eval, export
    final_eval = evaluate(ts.step)
    loading.export_hf_model(accelerator, training.module, tokenizer, folder.model)
    averaged = average.finish_run(accelerator, cfg, evaluate, ts.step, log)  # model_avg/
    summary = build_summary(
        ts, final_eval, num_processes=world, peak_tflops=peak_tflops,
        parts=(run_data.summary(), decision.summary(), rank_state.summary(cfg, accelerator),
               averaged, stepper.summary()),
        fill_mask=fill_check.after(accelerator, folder.model, ts.fill_mask_before))
    # the trackers' end (W&B: the summary into its own, its last records): a failure is a warning
    metrics_log.finish(summary)
    summary.update(metrics_log.summary())
    if accelerator.is_main_process:
        M.write_summary(folder.root, summary)
        log(f"done: eval perplexity {ts.first_eval[M.EVAL_PERPLEXITY]:.2f} -> "
            f"{final_eval[M.EVAL_PERPLEXITY]:.2f} in {ts.total.seconds:.0f} s of training; "
            f"outputs in {folder.root}")
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    from mlmkit.cli import run_cli
    run_cli(main)
