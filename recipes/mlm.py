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
checkpoints/checkpoint-<step>/ every --checkpointing_steps (the newest --save_total_limit kept).

Kill it anywhere and run the same command again: it resumes from the newest complete checkpoint
(--resume_from_checkpoint auto) to the same result. SIGTERM/SIGINT stop it cleanly: every process
finishes the current step, a checkpoint is saved, and it exits with status 0 without summary.json
or model/ (Slurm's --requeue then reruns the same command); see mlmkit/checkpoint.py.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if SRC.is_dir() and str(SRC) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(SRC))

from mlmkit import checkpoint as ckpt  # noqa: E402
from mlmkit import tracking as M  # noqa: E402  (metric names)
from mlmkit.config import ConfigError, MLMConfig, parse_config  # noqa: E402
from mlmkit.data import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    # ============================================================================ config
    # Everything that can be wrong with the config fails here, before any model loads.
    cfg: MLMConfig = parse_config(sys.argv[1:] if argv is None else argv)
    trackers = M.check_trackers(cfg.report_to)  # a missing tracker package is a ConfigError
    output_dir = Path(cfg.output_dir)
    # A finished run or other settings in output_dir -> ConfigError; else fresh start or resume.
    resume = ckpt.check_output_dir(cfg)

    # Heavy imports after validation: a bad flag fails in a second, not after loading torch libs.
    import transformers
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from mlmkit.collator import MaskedLMCollator, drop_targets
    from mlmkit.data import IndexedExamples, load_raw_datasets, tokenize_datasets
    from mlmkit.evaluation import evaluate, eval_collator
    from mlmkit.loop import TokenCounter, build_optimizer, build_scheduler, train_step
    from mlmkit.modeling import MaskedLMModule, load_model, load_tokenizer, position_offset
    from mlmkit.sampler import TrainPlan

    # ============================================================================ accelerator
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    no_gpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        # Without a GPU: DDP needs cpu=True (else each process thinks it is alone); DeepSpeed
        # must keep cpu=False (cpu=True disables it) and needs an explicit gloo group.
        cpu=no_gpu and not use_deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if no_gpu and distributed else [],
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=trackers or None, project_dir=str(output_dir),
    )
    if accelerator.state.deepspeed_plugin is not None:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # The recipe owns these; the DeepSpeed config says "auto" for them.
        ds_config["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    main_proc = accelerator.is_main_process
    log = accelerator.print
    if not main_proc:
        transformers.logging.set_verbosity_error()
    ckpt.check_launch(resume, accelerator)  # same processes and engine as the checkpoint's
    if main_proc:  # wipe (--overwrite_output_dir), cut metrics.jsonl back to the checkpoint
        ckpt.prepare_output_dir(cfg, resume)
    for warning in resume.warnings:
        log(f"warning: {warning}")
    accelerator.wait_for_everyone()
    # Same seed on every process while the model is built (a new MLM head must be identical on
    # all ranks, ZeRO-3 included); per-process seeds for dropout afterwards.
    set_seed(cfg.seed)

    # ============================================================================ data
    tokenizer = load_tokenizer(cfg)
    with accelerator.main_process_first():
        tokenized = tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)
    train_set, eval_set = IndexedExamples(tokenized["train"]), IndexedExamples(tokenized["validation"])
    lengths = train_set.lengths
    log(f"data: {len(train_set)} train / {len(eval_set)} validation examples, "
        f"{sum(lengths)} train tokens, median length {sorted(lengths)[len(lengths) // 2]}")

    # ============================================================================ model
    model = load_model(cfg, tokenizer)
    offset = position_offset(model)
    module = MaskedLMModule(model, sparse_prediction=cfg.sparse_prediction)
    if cfg.sparse_prediction and not module.sparse_prediction:
        log(f"notice: {type(model).__name__} has no known MLM head layout; using the full head.")
    collator = MaskedLMCollator(
        tokenizer, mlm_probability=cfg.mlm_probability, mask_replace_prob=cfg.mask_replace_prob,
        random_replace_prob=cfg.random_replace_prob, whole_word_mask=cfg.whole_word_mask,
        padding=cfg.padding, max_length=cfg.max_seq_length, pad_to_multiple_of=cfg.pad_to_multiple_of,
        seed=cfg.seed, attn_implementation=cfg.attn_implementation, position_offset=offset)
    eval_coll = eval_collator(tokenizer, cfg, position_offset=offset)

    plan = TrainPlan(lengths, per_device_batch_size=cfg.per_device_train_batch_size,
                     grad_accum=cfg.gradient_accumulation_steps,
                     num_processes=accelerator.num_processes,
                     process_index=accelerator.process_index, seed=cfg.seed,
                     group_by_length=cfg.group_by_length,
                     pack_capacity=cfg.max_seq_length if cfg.padding == "packed" else None)
    max_steps = cfg.max_train_steps or math.ceil(cfg.num_train_epochs * len(plan))
    num_epochs = math.ceil(max_steps / len(plan))

    optimizer = build_optimizer(module, cfg)
    module, optimizer = accelerator.prepare(module, optimizer)
    # Built on the prepared optimizer (ZeRO-3 regroups parameters) and stepped by us, once per
    # optimizer step; not handed to prepare(), which would step it once per process.
    scheduler = build_scheduler(optimizer, cfg, max_steps)
    accelerator.register_for_checkpointing(scheduler)
    set_seed(cfg.seed, device_specific=True)

    # ============================================================================ trackers
    if "wandb" in trackers:
        notice = M.setup_wandb_env(cfg.output_dir)
        if notice:
            log(notice)
    ts = resume.state or ckpt.TrainState(launch=ckpt.launch_signature(accelerator))
    if trackers:  # a resumed run continues its W&B run (same id)
        accelerator.init_trackers(cfg.wandb_project, config=cfg.to_dict(),
                                  init_kwargs=M.tracker_init_kwargs(cfg, ts.wandb_run_id))
        ts.wandb_run_id = M.wandb_run_id(accelerator)
    metrics_log = M.MetricsLog(accelerator, output_dir)
    unit = "rows" if cfg.padding == "packed" else "examples"
    log(f"train: {max_steps} steps x {plan.global_batch_size} {unit} "
        f"({cfg.per_device_train_batch_size} per device x {cfg.gradient_accumulation_steps} "
        f"accumulation x {accelerator.num_processes} processes), padding={cfg.padding}, "
        f"mask_padding={cfg.mask_padding}, sparse_prediction={module_sparse(accelerator, module)}")

    def run_eval(step: int) -> dict:
        metrics = evaluate(accelerator, module, eval_set, eval_coll,
                           batch_size=cfg.per_device_eval_batch_size,
                           max_seq_length=cfg.max_seq_length,
                           with_unmasked=cfg.eval_pad_sensitivity,
                           with_pad_probe=cfg.eval_pad_sensitivity)
        metrics_log.log(metrics, step)
        log(f"eval @ step {step}: loss {metrics[M.EVAL_LOSS]:.4f}, "
            f"perplexity {metrics[M.EVAL_PERPLEXITY]:.2f}")
        return metrics

    # ============================================================================ resume
    # Last before the loop: load_state restores every process's RNG as it was at the save.
    if resume.checkpoint is not None:
        ckpt.load_checkpoint(accelerator, resume)
        log(f"resuming from {resume.checkpoint} (step {ts.step}; epoch {ts.epoch}, "
            f"batch {ts.step_in_epoch} of it)")
    ts.first_eval = ts.first_eval or run_eval(0)

    # ============================================================================ train
    counter, totals = TokenCounter(), TokenCounter()  # this log window; the whole run
    counter.computed, counter.real = ts.window_tokens
    totals.computed, totals.real = ts.total_tokens
    stopper = ckpt.StopSignal().install()  # SIGTERM/SIGINT: checkpoint at the next step, stop

    def save_checkpoint() -> Path:
        ts.window_tokens = [counter.computed, counter.real]
        ts.total_tokens = [totals.computed, totals.real]
        return ckpt.save_checkpoint(accelerator, cfg, ts)

    progress = tqdm(total=max_steps, initial=ts.step, desc="train",
                    disable=not (main_proc and cfg.progress_bar))
    module.train()
    stop = False
    for epoch in range(ts.epoch, num_epochs):
        collator.set_epoch(epoch)
        start = ts.step_in_epoch if epoch == ts.epoch else 0
        for step_in_epoch, micro_plan in plan.epoch(epoch, start_step=start):
            if stop or ts.step >= max_steps:
                break
            micro_batches = []
            for micro in micro_plan:
                indices, rows = plan.layout(micro)  # rows: the packed layout, or None
                batch = collator(train_set.fetch(indices or [0]), rows=rows)
                if not indices:  # this process ran out of examples
                    drop_targets(batch)
                counter.add(batch, dummy=not indices)
                totals.add(batch, dummy=not indices)
                micro_batches.append(batch)
            t0 = time.perf_counter()
            out = train_step(accelerator, module, optimizer, scheduler, micro_batches,
                             mask_padding=cfg.mask_padding, max_grad_norm=cfg.max_grad_norm)
            ts.train_time += time.perf_counter() - t0
            ts.step, ts.epoch, ts.step_in_epoch = ts.step + 1, epoch, step_in_epoch + 1
            step = ts.step
            ts.window_loss += out["loss"] * out["masked_tokens"]
            ts.window_masked += out["masked_tokens"]
            progress.update(1)
            if step % cfg.logging_steps == 0 or step == max_steps:
                rates = counter.pop(ts.train_time - ts.logged_time, accelerator.num_processes)
                ts.logged_time = ts.train_time
                loss = ts.window_loss / max(ts.window_masked, 1)
                metrics = {M.TRAIN_LOSS: loss, M.TRAIN_LR: scheduler.get_last_lr()[0],
                           M.TRAIN_MASKED_TOKENS: ts.window_masked, M.EPOCH: step / len(plan),
                           M.SYS_PEAK_MEM_GB: peak_mem_gb(), **rates}
                if out["grad_norm"] is not None:
                    metrics[M.TRAIN_GRAD_NORM] = out["grad_norm"]
                metrics_log.log(metrics, step)
                progress.set_postfix(loss=f"{loss:.3f}",
                                     tok_s=f"{rates[M.TRAIN_REAL_TOKENS_PER_S]:.0f}")
                ts.window_loss, ts.window_masked = 0.0, 0
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < max_steps:
                run_eval(step)
            # ---- checkpoint; after a signal every process stops after this same step
            periodic = bool(cfg.checkpointing_steps) and step % cfg.checkpointing_steps == 0
            if periodic:
                last_checkpoint = save_checkpoint()
            stop = stopper.agreed(accelerator)
            if stop and not periodic:
                last_checkpoint = save_checkpoint()
    progress.close()
    stopper.restore()  # signals are handled between training steps only
    if stop:  # pre-empted: not finished, so no summary.json and no model/
        log(f"stopped by {stopper.received or 'a signal to another process'} after step "
            f"{ts.step} of {max_steps}; saved {last_checkpoint}. To resume, run the same command "
            "again (--resume_from_checkpoint auto finds the newest checkpoint).")
        accelerator.end_training()
        return {"stopped": True, M.STEP: ts.step, "checkpoint": str(last_checkpoint)}

    # ============================================================================ final eval + export
    first_eval = ts.first_eval
    final_eval = run_eval(ts.step)
    ckpt.export_hf_model(accelerator, module, tokenizer, output_dir / "model")
    summary = {**final_eval, "first/" + M.EVAL_LOSS: first_eval[M.EVAL_LOSS],
               "first/" + M.EVAL_PERPLEXITY: first_eval[M.EVAL_PERPLEXITY],
               M.TRAIN_RUNTIME: ts.train_time, M.STEP: ts.step, M.SYS_PEAK_MEM_GB: peak_mem_gb(),
               **totals.pop(ts.train_time, accelerator.num_processes),  # whole-run throughput
               "train/examples": len(train_set), "num_processes": accelerator.num_processes}
    if main_proc:
        ckpt.write_json_atomic(output_dir / "summary.json", summary)
        log(f"done: eval perplexity {first_eval[M.EVAL_PERPLEXITY]:.2f} -> "
            f"{final_eval[M.EVAL_PERPLEXITY]:.2f} in {ts.train_time:.0f} s of training; "
            f"outputs in {output_dir}")
    accelerator.end_training()
    return summary


# ================================================================================ helpers
def module_sparse(accelerator, module) -> bool:
    return accelerator.unwrap_model(module).sparse_prediction


def peak_mem_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as err:
        print(f"mlmkit: error: {err}", file=sys.stderr)
        sys.exit(2)
