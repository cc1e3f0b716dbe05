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
or model/ (Slurm's --requeue then reruns the same command); see mlmkit/preemption.py.
How a run flows and which module keeps which contract: docs/design.md.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if SRC.is_dir() and str(SRC) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(SRC))

from mlmkit import tracking as M  # noqa: E402  (metric names)
from mlmkit.config import ConfigError, MLMConfig, parse_config  # noqa: E402
from mlmkit.data import DataError  # noqa: E402
from mlmkit.rundir import check_output_dir, prepare_output_dir  # noqa: E402
from mlmkit.runlock import lock_output_dir  # noqa: E402


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
    output_dir = Path(cfg.output_dir)
    # A finished run or other settings in output_dir -> ConfigError; else fresh start or resume.
    resume = check_output_dir(cfg)

    # Heavy imports after validation: a bad flag fails in a second, not after loading torch libs.
    import transformers
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from datasets import DatasetDict

    from mlmkit.checkpoint import (RunningStats, TrainState, load_checkpoint, read_rank_state,
                                   save_checkpoint)
    from mlmkit.collator import MaskedLMCollator
    from mlmkit.data import DataRepairs, IndexedExamples, load_and_tokenize, tokenize_datasets
    from mlmkit.distributed import build_accelerator, check_launch, launch_signature
    from mlmkit.evaluation import evaluate, eval_collator
    from mlmkit.fileio import write_json_atomic
    from mlmkit.fill_mask import choose_probes, combine, format_lines, initial_predictions, predict
    from mlmkit.flops import FlopCounter, device_peak_tflops
    from mlmkit.loop import StepResults, build_optimizer, build_scheduler, train_step
    from mlmkit.modeling import (MaskedLMModule, attn_implementation, export_hf_model, load_model,
                                 load_tokenizer, position_offset)
    from mlmkit.prefetch import PlannedSteps, Prefetcher
    from mlmkit.pretokenize import load_pretokenized
    from mlmkit.preemption import StopSignal
    from mlmkit.probe import probe_isolation, resolve_padding
    from mlmkit.sampler import TrainPlan
    from mlmkit.streaming import StreamPosition, StreamSteps, describe_source, held_out_eval

    # ============================================================================ accelerator
    accelerator = build_accelerator(cfg, trackers)  # CPU/GPU/DeepSpeed cases: see its docstring
    main_proc = accelerator.is_main_process
    log = accelerator.print
    if not main_proc:
        transformers.logging.set_verbosity_error()
    if resume.state is not None:  # same processes and engine as the checkpoint's
        check_launch(resume.state.launch, resume.checkpoint, accelerator)
    # Same seed on every process while the model is built (a new MLM head must be identical on
    # all ranks, ZeRO-3 included); per-process seeds for dropout afterwards.
    set_seed(cfg.seed)

    # ============================================================================ data
    tokenizer = load_tokenizer(cfg)
    repairs = DataRepairs()  # lines with bytes that are not UTF-8, replaced and counted
    # One process tokenizes into the datasets cache (one per node with a node-local cache), the
    # others wait (up to --ddp_timeout) and read it.
    first = accelerator.local_main_process_first if cfg.data_cache_per_node \
        else accelerator.main_process_first
    stream_exclude = frozenset()  # --streaming: texts held out for eval, never trained on
    if cfg.tokenized_dir:  # written by recipes/pretokenize.py: nothing to tokenize
        tokenized = load_pretokenized(cfg.tokenized_dir, tokenizer, cfg)
    elif cfg.streaming:  # only the eval set is tokenized up front
        with first():
            raw_eval, stream_exclude = held_out_eval(cfg)
            tokenized = tokenize_datasets(DatasetDict({"validation": raw_eval}), tokenizer, cfg)
    else:
        with first():
            tokenized = load_and_tokenize(cfg, tokenizer, repairs)
    if repairs.total:
        log(f"warning: {repairs.warning()}")
    eval_set = IndexedExamples(tokenized["validation"])
    if cfg.streaming:
        train_set = None
        log(f"data: streaming {describe_source(cfg)}; {len(eval_set)} validation examples "
            f"({'held out from the stream' if stream_exclude else 'from the validation split'})")
    else:
        train_set = IndexedExamples(tokenized["train"])
        lengths = train_set.lengths
        log(f"data: {len(train_set)} train / {len(eval_set)} validation examples, "
            f"{int(lengths.sum(dtype='int64'))} train tokens, median length "
            f"{int(np.median(lengths))}")

    # ============================================================================ model
    model = load_model(cfg, tokenizer)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offset, attn = position_offset(model), attn_implementation(model)
    flop_counter = FlopCounter.for_model(model)  # train/tflops and train/mfu
    module = MaskedLMModule(model, sparse_prediction=cfg.sparse_prediction)
    optimizer = build_optimizer(module, cfg)
    module, optimizer = accelerator.prepare(module, optimizer)
    # The training forward, compiled with --torch_compile (eval and the probe run eager).
    compiled = compile_forward(module, accelerator, cfg.torch_compile_mode) \
        if cfg.torch_compile else None
    peak_tflops = device_peak_tflops(accelerator, cfg.peak_tflops)

    # ============================================================================ isolation probe
    # On the model in hand (every process, same forwards): is padding under the mask, and are
    # packed neighbours, invisible to each example? A mode that is not is refused here, before
    # anything is written to output_dir.
    inner = accelerator.unwrap_model(module)
    isolation = probe_isolation(inner.model, tokenizer, attn_implementation=attn,
                                position_offset=offset, max_length=cfg.max_seq_length,
                                device=accelerator.device,
                                head_logits=inner.head_logits if inner.sparse_prediction else None)
    padding, why = resolve_padding(cfg.padding, isolation, group_by_length=cfg.group_by_length,
                                   accept_padding_leak=cfg.accept_padding_leak)
    log(f"isolation probe ({isolation.architecture}, {attn}): padded "
        f"{isolation.describe('padded')}; packed {isolation.describe('packed')}; {why}")
    if cfg.sparse_prediction and not isolation.sparse_head:
        inner.sparse_prediction = False
        log(f"notice: {isolation.architecture} has no masked-only head layout that matches its "
            "full head; using the full head.")

    # ============================================================================ run folder
    if main_proc:  # wipe (--overwrite_output_dir), cut metrics.jsonl back to the checkpoint
        prepare_output_dir(cfg, resume)
    for warning in resume.warnings:
        log(f"warning: {warning}")
    accelerator.wait_for_everyone()

    # ============================================================================ batches
    # Compiled + packed: rows at a fixed (rows, max_seq_length) shape, so the graph is static.
    fixed = {"pad_to_multiple_of": cfg.max_seq_length} \
        if cfg.torch_compile and padding == "packed" else {}
    collator = MaskedLMCollator.from_config(tokenizer, cfg, position_offset=offset,
                                            attn_implementation=attn, padding=padding, **fixed)
    eval_coll = eval_collator(tokenizer, cfg, position_offset=offset, attn_implementation=attn)
    global_batch_size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * \
        accelerator.num_processes  # examples, or rows when packed
    if cfg.streaming:  # no plan: steps come from the stream (streaming.py)
        plan, max_steps, num_epochs = None, cfg.max_train_steps, None
    else:
        plan = TrainPlan(train_set.lengths, per_device_batch_size=cfg.per_device_train_batch_size,
                         grad_accum=cfg.gradient_accumulation_steps,
                         num_processes=accelerator.num_processes,
                         process_index=accelerator.process_index, seed=cfg.seed,
                         group_by_length=cfg.group_by_length,
                         pack_capacity=cfg.max_seq_length if padding == "packed" else None)
        max_steps = cfg.max_train_steps or math.ceil(cfg.num_train_epochs * len(plan))
        num_epochs = math.ceil(max_steps / len(plan))
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
    ts = resume.state or TrainState(launch=launch_signature(accelerator))
    if trackers:  # a resumed run continues its W&B run (same id)
        accelerator.init_trackers(cfg.wandb_project, config={
                                      **cfg.to_dict(), "padding_resolved": padding,
                                      **isolation.metrics()},
                                  init_kwargs=M.tracker_init_kwargs(cfg, ts.wandb_run_id))
        ts.wandb_run_id = M.wandb_run_id(accelerator)
    metrics_log = M.MetricsLog(accelerator, output_dir)
    unit = "rows" if padding == "packed" else "examples"
    log(f"train: {max_steps} steps x {global_batch_size} {unit} "
        f"({cfg.per_device_train_batch_size} per device x {cfg.gradient_accumulation_steps} "
        f"accumulation x {accelerator.num_processes} processes), padding={padding}, "
        f"mask_padding={cfg.mask_padding}, sparse_prediction={inner.sparse_prediction}")

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
        load_checkpoint(accelerator, resume.checkpoint)
        log(f"resuming from {resume.checkpoint} (step {ts.step}; "
            + (f"pass {ts.epoch} of the stream)" if cfg.streaming else
               f"epoch {ts.epoch}, batch {ts.step_in_epoch} of it)"))
    # What only this process knows: its stream position, its tokens per mixture source.
    rank_state = read_rank_state(resume.checkpoint, accelerator.process_index) or {}
    num_sources = len(cfg.mixture_files)
    source_tokens = rank_state.get("source_tokens") or [0] * num_sources
    data_state = rank_state.get("stream")
    if cfg.streaming and resume.checkpoint is not None and data_state is None:
        raise ConfigError(f"checkpoint {resume.checkpoint} has no data_state_"
                          f"{accelerator.process_index}.json (the stream position of process "
                          f"{accelerator.process_index}). Fix: resume from another checkpoint "
                          "(--resume_from_checkpoint), or start afresh with "
                          "--overwrite_output_dir true.")

    def rank_state_now() -> dict | None:
        if not (cfg.streaming or num_sources):
            return None
        return {"stream": data_state, "source_tokens": source_tokens}
    ts.first_eval = ts.first_eval or run_eval(0)
    # Fill-mask check, "before": the initial model, exported like model/ and tried on CPU (main
    # process); kept in the train state, so a resumed run reports it too.
    probes = choose_probes(tokenizer, eval_set) if cfg.fill_mask_check else []
    if probes and ts.step == 0:
        ts.fill_mask_before = initial_predictions(accelerator, module, tokenizer,
                                                  output_dir / "model.initial", probes)

    # ============================================================================ train
    # Steps are prepared (collated, counted, pinned) ahead by workers; the step itself never
    # waits for the device: its results are read in one transfer at log/eval/checkpoint steps.
    stopper = StopSignal().install()  # SIGTERM/SIGINT: checkpoint at the next step, then stop
    progress = tqdm(total=max_steps, initial=ts.step, desc="train",
                    disable=not (main_proc and cfg.progress_bar))
    on_gpu = accelerator.device.type == "cuda"
    workers = cfg.dataloader_num_workers if cfg.dataloader_num_workers is not None else \
        (2 if on_gpu else 0)
    positions_multiple = 256 if cfg.torch_compile_mode == "reduce-overhead" else None
    if cfg.streaming:  # read, tokenized and packed on the fly by one process (its order is
        # its state), in a worker when there are workers
        workers = min(workers, 1)
        steps = StreamSteps(
            cfg, tokenizer, collator, process_index=accelerator.process_index,
            num_processes=accelerator.num_processes, packed=padding == "packed",
            exclude=stream_exclude,
            position=StreamPosition.from_dict(data_state) if data_state else None,
            flop_counter=flop_counter, sparse_head=inner.sparse_prediction,
            positions_multiple=positions_multiple, num_sources=num_sources)
    else:
        steps = PlannedSteps(
            plan, collator, train_set, start_epoch=ts.epoch, start_step=ts.step_in_epoch,
            num_epochs=num_epochs, max_length=cfg.max_seq_length, flop_counter=flop_counter,
            sparse_head=inner.sparse_prediction, positions_multiple=positions_multiple,
            num_sources=num_sources)
    prefetcher = Prefetcher(steps, num_workers=workers, pin_memory=on_gpu and workers > 0)
    pending = StepResults()
    grad_norm = None

    def read_results() -> None:  # the device's results of the pending steps -> the statistics
        nonlocal grad_norm
        for loss, masked, norm, seconds in pending.read():
            for stats in (ts.window, ts.total):
                stats.add_step(loss, masked, seconds)
            grad_norm = norm

    module.train()
    stop = False
    try:
        while not stop and ts.step < max_steps:
            t0 = time.perf_counter()
            try:
                prepared, waited = prefetcher.next()
            except StopIteration:
                break
            for stats in (ts.window, ts.total):
                stats.add_data(prepared.computed, prepared.real, prepared.flops, waited)
            if prepared.source_tokens is not None:
                source_tokens = [a + b for a, b in zip(source_tokens, prepared.source_tokens)]
            if prepared.data_state is not None:
                data_state = prepared.data_state
            out = train_step(accelerator, module, optimizer, scheduler, prepared.micro_batches,
                             mask_padding=cfg.mask_padding, max_grad_norm=cfg.max_grad_norm,
                             forward=compiled)
            pending.add(out, time.perf_counter() - t0)
            ts.step, ts.epoch = ts.step + 1, prepared.epoch
            ts.step_in_epoch = prepared.step_in_epoch + 1
            step = ts.step
            progress.update(1)
            if step % cfg.logging_steps == 0 or step == max_steps:
                read_results()
                window, ts.window = ts.window, RunningStats()
                rates = window.rates(accelerator.num_processes, peak_tflops)
                metrics = {M.TRAIN_LOSS: window.mean_loss(), M.TRAIN_LR: scheduler.get_last_lr()[0],
                           M.TRAIN_MASKED_TOKENS: window.masked,
                           M.EPOCH: step / len(plan) if plan else prepared.epoch,
                           M.SYS_PEAK_MEM_GB: peak_mem_gb(), **rates}
                if grad_norm is not None:
                    metrics[M.TRAIN_GRAD_NORM] = grad_norm
                metrics_log.log(metrics, step)
                progress.set_postfix(loss=f"{window.mean_loss():.3f}",
                                     tok_s=f"{rates[M.TRAIN_REAL_TOKENS_PER_S]:.0f}")
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < max_steps:
                read_results()
                run_eval(step)
            # ---- checkpoint; after a signal every process stops after this same step
            periodic = bool(cfg.checkpointing_steps) and step % cfg.checkpointing_steps == 0
            if periodic:
                read_results()
                last_checkpoint = save_checkpoint(accelerator, cfg, ts, rank_state_now())
            stop = stopper.agreed(accelerator)
            if stop and not periodic:
                read_results()
                last_checkpoint = save_checkpoint(accelerator, cfg, ts, rank_state_now())
    finally:
        prefetcher.close()
    read_results()
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
    mixture = {}
    if num_sources:  # trained tokens per source, all processes
        counts = accelerator.reduce(torch.tensor(source_tokens, device=accelerator.device),
                                    reduction="sum").tolist()
        mixture = {"data/mixture": dict(zip(cfg.mixture_files, cfg.mixture_weights)),
                   "data/source_tokens": dict(zip(cfg.mixture_files, counts)),
                   "data/source_share": {f: n / max(sum(counts), 1)
                                         for f, n in zip(cfg.mixture_files, counts)}}
    export_hf_model(accelerator, module, tokenizer, output_dir / "model")
    # Fill-mask check, "after": the exported model/ read back from disk (main process, CPU).
    fill_mask = combine(probes, ts.fill_mask_before, predict(output_dir / "model", probes)) \
        if probes and main_proc else []
    summary = {**final_eval, "first/" + M.EVAL_LOSS: first_eval[M.EVAL_LOSS],
               "first/" + M.EVAL_PERPLEXITY: first_eval[M.EVAL_PERPLEXITY],
               M.TRAIN_RUNTIME: ts.total.seconds, M.STEP: ts.step,
               M.SYS_PEAK_MEM_GB: peak_mem_gb(),
               M.TRAIN_MFU: None, "train/peak_tflops": peak_tflops,  # None: peak unknown
               **ts.total.rates(accelerator.num_processes, peak_tflops),  # whole-run throughput
               "train/examples": len(train_set) if train_set else None,
               "num_processes": accelerator.num_processes, **mixture,
               "data/repaired_lines": repairs.total,
               "padding": padding, **isolation.metrics()}
    if main_proc:
        if fill_mask:
            summary["fill_mask"] = fill_mask
            for line in format_lines(fill_mask):
                log(line)
        write_json_atomic(output_dir / "summary.json", summary)
        log(f"done: eval perplexity {first_eval[M.EVAL_PERPLEXITY]:.2f} -> "
            f"{final_eval[M.EVAL_PERPLEXITY]:.2f} in {ts.total.seconds:.0f} s of training; "
            f"outputs in {output_dir}")
    accelerator.end_training()
    return summary


# ================================================================================ helpers
def compile_forward(module, accelerator, mode: str):
    """``torch.compile`` of the prepared training module (inductor; DDP or one process)."""
    from accelerate.utils import DistributedType
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU,
                                            DistributedType.MULTI_CPU):
        raise ConfigError(f"--torch_compile is supported with DDP or one process, not under "
                          f"{accelerator.distributed_type.value}. Fix: drop --torch_compile, or "
                          "launch without DeepSpeed/FSDP.")
    return torch.compile(module, mode=mode)


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
