"""Training throughput: mlmkit's modes against the Hugging Face baseline, side by side.

    python benchmarks/throughput.py [--steps 20] [--batch_size 16] [--max_seq_length 128] \
        [--model_name_or_path PATH] [--attn_implementation sdpa] [--bf16] [--torch_compile] \
        [--peak_tflops N] [--output benchmarks/results/throughput.json]

Same model (default: the embedded all-MiniLM-L6-v2), same corpus (the embedded CPython docs,
line by line), same batch size, same optimizer (fused AdamW) and the same number of timed steps
for every mode, in one process run. Modes:

* ``hf_baseline`` -- what a user of ``run_mlm_no_trainer.py --line_by_line`` gets: the tokenizer
  without padding, ``DataCollatorForLanguageModeling``, random batches, ``model(**batch).loss``
  (the full vocabulary head at every position);
* ``padded`` -- mlmkit, dynamic padding with the attention mask, full head;
* ``padded_sparse`` -- the same with the masked-only head (``--sparse_prediction``, the default);
* ``group_by_length`` -- length-grouped batches, masked-only head;
* ``packed`` -- rows of max_seq_length packed with isolated examples (block-diagonal mask,
  restarted positions), full head; ``--per_device_train_batch_size`` counts rows here, so packed
  steps hold more examples: compare real tokens/s, not steps/s;
* ``packed_sparse`` -- packed with the masked-only head;
* ``recipe`` -- the recipe's own training step on the packed_sparse batches: Accelerate
  (``mixed_precision`` bf16 or no), the recipe's assembly (`steps.RunSteps`: its `Prefetcher`
  over `PlannedSteps`) and its `loop.Stepper` (`train_step`, the busy clock's calibration on a
  GPU, results read every 10 steps, as ``--logging_steps``),
  so that "recipe vs inner loop" is one column. The inner-loop modes synchronise every step (to
  time it); the recipe's step does not, and is timed from the first to the last step's read.

``--shape modernbert|deberta-v3|esm2`` trains, instead of the embedded MiniLM, a randomly
initialised model of that architecture, realistically shaped but scaled down (`SHAPES`: the real
configs' ratios and attention settings, fewer and narrower layers), with the embedded tokenizer
and corpus; each runs the packed path mlmkit picks for it (`modeling.use_packed_path`), and the
baseline the same model as transformers runs it.

``--torch_compile`` compiles the training module of every mlmkit mode and the recipe step
(``--torch_compile_mode``: reduce-overhead adds CUDA graphs); packed batches then have the
recipe's static shapes (`steps.StaticShapes`: fixed rows, masked positions and boundaries);
the first ``--warmup`` steps absorb compilation and CUDA-graph recording. On CUDA the BERT family
trains packed rows with the variable-length kernel, as the recipe does (`modeling.VARLEN_TYPES`;
``--attn_implementation sdpa`` for the dense block mask); the baseline runs transformers' SDPA.

Reported per mode: real (non-padding) tokens/s, all positions/s, pad fraction, ms per step, model
TFLOP/s and MFU (`mlmkit.model.flops`: the FLOPs each mode must do, so padding is not counted), peak
memory (GPU: max allocated per mode; CPU: n/a, as the process's peak RSS only grows across modes),
and the ratio of real tokens/s to the baseline's. Written as JSON too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from accelerate.utils import send_to_device  # noqa: E402

from mlmkit.batch.collator import MaskedLMCollator, model_inputs  # noqa: E402
from mlmkit.config.choices import GRAPHED_COMPILE_MODES  # noqa: E402
from mlmkit.config.choices import PACKED_ATTENTION as PACKED  # noqa: E402
from mlmkit.config.parse import parse_config  # noqa: E402
from mlmkit.config.shape import run_shape  # noqa: E402
from mlmkit.data.corpus import IndexedExamples, load_raw_datasets, tokenize_datasets  # noqa: E402
from mlmkit.data.plans import TrainPlan  # noqa: E402
from mlmkit.data.position import DataPosition  # noqa: E402
from mlmkit.model.checks import load_tokenizer, position_offset  # noqa: E402
from mlmkit.model.flops import FlopCounter, peak_tflops  # noqa: E402
from mlmkit.model.loading import MaskedLMModule, attn_implementation, load_model  # noqa: E402
from mlmkit.train.checkpoint import TrainState  # noqa: E402
from mlmkit.train.loop import Stepper  # noqa: E402
from mlmkit.train.optim import build_optimizer, prepare_training  # noqa: E402
from mlmkit.train.steps import RunSteps, StaticShapes, StepPreparer  # noqa: E402

# Scaled-down, realistically shaped configs (random init): the architecture's attention settings
# as released, fewer/narrower layers so that a CPU runs them.
SHAPES = {
    # ModernBERT-base: 22 layers of 768, 12 heads, GLU 1152, a global layer every 3, local 128
    "modernbert": ("modernbert", dict(hidden_size=256, num_hidden_layers=6,
                                      num_attention_heads=4, intermediate_size=384,
                                      global_attn_every_n_layers=3, local_attention=128)),
    # DeBERTa-v3-base: 12 layers of 768, 12 heads, 3072 FFN, relative attention (p2c, c2p,
    # 256 log buckets), no absolute positions
    "deberta-v3": ("deberta-v2", dict(hidden_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, intermediate_size=1024,
                                      relative_attention=True, position_biased_input=False,
                                      pos_att_type=["p2c", "c2p"], position_buckets=256,
                                      max_relative_positions=-1, norm_rel_ebd="layer_norm",
                                      share_att_key=True, legacy=False)),
    # ESM-2 8M (esm2_t6_8M_UR50D) as released: 6 layers of 320, 20 heads, rotary, token dropout
    "esm2": ("esm", dict(hidden_size=320, num_hidden_layers=6, num_attention_heads=20,
                         intermediate_size=1280, position_embedding_type="rotary",
                         token_dropout=True, emb_layer_norm_before=False,
                         max_position_embeddings=1026)),
}


def shape_config_dir(shape: str, folder: Path, tokenizer: str | None = None) -> str:
    """``folder`` holding the config.json of ``shape`` for ``tokenizer`` (default: the embedded
    model's)."""
    from transformers import AutoConfig, AutoTokenizer

    from mlmkit.model.checks import embedded_model_path
    tok = AutoTokenizer.from_pretrained(tokenizer or embedded_model_path())
    model_type, overrides = SHAPES[shape]
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    if model_type == "esm":
        ids["mask_token_id"] = tok.mask_token_id
    if model_type == "modernbert":
        ids.update(cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                   bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    config = AutoConfig.for_model(model_type, **overrides, **ids)
    if getattr(config, "layer_types", None) is not None and model_type == "modernbert":
        every = overrides["global_attn_every_n_layers"]
        config.layer_types = ["full_attention" if i % every == 0 else "sliding_attention"
                              for i in range(config.num_hidden_layers)]
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    return str(folder)


def peak_mem_gb(device) -> float | None:
    """Max GPU memory allocated since the last reset; None on CPU (no per-mode peak there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_mode(name, model, batches, real, flops, device, args, *, sparse: bool, hf: bool) -> dict:
    """Train ``len(batches)`` steps (the first ``args.warmup`` untimed); return the measurements.

    ``real``: non-padding tokens per batch; ``flops``: model FLOPs per batch. ``hf``: the
    baseline's own step, ``model(**batch).loss`` (mean over its masked tokens, full head at every
    position), as the HF script does.
    """
    module = MaskedLMModule(model, sparse_prediction=sparse).to(device)
    compiled = args.torch_compile and not hf
    forward = torch.compile(module, mode=args.torch_compile_mode) if compiled else module
    graphs = compiled and args.torch_compile_mode in GRAPHED_COMPILE_MODES
    optimizer = build_optimizer(module, parse_config(["--learning_rate", "1e-5"]))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    module.train()  # dropout on, as in training (from_pretrained returns eval mode)
    reset_peak(device)
    n_real = computed = n_flops = 0
    elapsed = 0.0
    for i, (batch, r, f) in enumerate(zip(batches, real, flops)):
        sync(device)
        t0 = time.perf_counter()
        batch = send_to_device(batch, device)
        with autocast:
            if hf:
                loss = model(**batch).loss
            else:
                if graphs:  # CUDA graphs: a new step (as loop.train_step marks it)
                    torch.compiler.cudagraph_mark_step_begin()
                loss_sum, count = forward(**model_inputs(batch))
                loss = loss_sum / count.clamp(min=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            elapsed += time.perf_counter() - t0
            computed += batch["input_ids"].numel()
            n_real += r
            n_flops += f
    return measurements(name, len(batches) - args.warmup, n_real, computed, n_flops, elapsed,
                        device)


def run_recipe_step(model, cfg, tokenizer, examples, n_steps, device, args) -> dict:
    """The recipe's own training steps (see the module doc) on packed rows, masked-only head:
    the recipe's assembly (`optim.prepare_training`, `steps.RunSteps`) and its `loop.Stepper`
    (busy clock, compiled warm-up, one read per 10 steps) on the same flags, so this column
    measures the recipe."""
    from accelerate import Accelerator
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no",
                              cpu=device.type == "cpu")
    cfg = recipe_config(cfg, args, padding="packed", max_train_steps=n_steps)
    training = prepare_training(cfg, accelerator, model)
    run_steps = RunSteps.build(cfg, accelerator, training, tokenizer, examples, padding="packed")
    steps = run_steps.prefetcher()
    stepper = Stepper(accelerator, training, run_steps.scheduler, cfg, TrainState())
    reset_peak(device)
    n_real = computed = n_flops = 0
    training.module.train()
    for i in range(n_steps):
        if i == args.warmup:
            stepper.read()  # everything before is warm-up (and compilation)
            t0 = time.perf_counter()
        t_step = time.perf_counter()
        prepared, _ = steps.next()
        stepper(prepared, t_step)
        if (i + 1) % 10 == 0:
            stepper.read()  # what --logging_steps 10 reads
        if i >= args.warmup:
            computed += prepared.computed
            n_real += prepared.real
            n_flops += prepared.flops
    stepper.read()
    elapsed = time.perf_counter() - t0
    steps.close()
    return measurements("recipe", n_steps - args.warmup, n_real, computed, n_flops, elapsed,
                        device)


def recipe_config(cfg, args, *, padding: str, **more):
    """The recipe config of a mode: the benchmark's batch, compile and worker flags."""
    rows = args.packed_rows or args.batch_size
    return dataclasses.replace(
        cfg, padding=padding, learning_rate=1e-5, torch_compile=args.torch_compile,
        torch_compile_mode=args.torch_compile_mode,
        per_device_train_batch_size=rows if padding == "packed" else args.batch_size,
        dataloader_num_workers=args.dataloader_num_workers, **more)


def measurements(name, steps, n_real, computed, n_flops, elapsed, device) -> dict:
    return {"mode": name, "steps": steps, "real_tokens_per_s": n_real / elapsed,
            "tokens_per_s": computed / elapsed, "pad_fraction": 1 - n_real / computed,
            "ms_per_step": 1000 * elapsed / steps, "tflops": n_flops / elapsed / 1e12,
            "peak_mem_gb": peak_mem_gb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--packed_rows", type=int, default=None,
                        help="rows per packed batch (default: batch_size)")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--attn_implementation", default=None,
                        help="default: transformers' choice, or mlmkit's packed path (--shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="a scaled-down, randomly initialised model of this architecture")
    parser.add_argument("--tokenizer_name", default=None,
                        help="the tokenizer folder (default: the model's, or the embedded one)")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--torch_compile", action="store_true",
                        help="torch.compile the training module (mlmkit modes and recipe)")
    parser.add_argument("--torch_compile_mode", default="default",
                        help="torch.compile mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--dataloader_num_workers", type=int, default=None,
                        help="the recipe mode's collating workers (default: 2 on a GPU, 0 on CPU)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's dense peak for MFU (default: mlmkit.model.flops' table)")
    parser.add_argument("--modes", default="hf_baseline,padded,padded_sparse,group_by_length,"
                                           "packed,packed_sparse,recipe")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/throughput.json"))
    args = parser.parse_args()

    from transformers import DataCollatorForLanguageModeling

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flags = ["--max_seq_length", str(args.max_seq_length)]
    if args.attn_implementation:
        flags += ["--attn_implementation", args.attn_implementation]
    if args.model_name_or_path:
        flags += ["--model_name_or_path", args.model_name_or_path]
    if args.tokenizer_name:
        flags += ["--tokenizer_name", args.tokenizer_name]
    if args.shape:
        import tempfile
        flags += ["--config_name",
                  shape_config_dir(args.shape, Path(tempfile.mkdtemp()) / args.shape,
                                   args.tokenizer_name)]
    cfg = parse_config(flags)
    tokenizer = load_tokenizer(cfg)
    train = tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)["train"]
    examples = IndexedExamples(train)
    n_steps = args.steps + args.warmup
    torch.manual_seed(0)
    model = load_model(cfg, tokenizer, device=device).to(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    offset, attn = position_offset(model), attn_implementation(model)
    counter = FlopCounter.for_model(model)

    def plan(**kw):
        return TrainPlan(examples.lengths, grad_accum=1, num_processes=1, process_index=0, seed=0,
                         **kw)

    def mlmkit_batches(padding: str, p: TrainPlan, sparse: bool):
        mode_cfg = recipe_config(cfg, args, padding=padding)  # the recipe's collator, width
        shape = run_shape(mode_cfg, num_processes=1, on_gpu=device.type == "cuda",
                          padding=padding)
        collator = MaskedLMCollator.from_config(tokenizer, mode_cfg, position_offset=offset,
                                                attn_implementation=attn, padding=padding,
                                                pad_to_multiple_of=shape.pad_to_multiple_of)
        # the recipe's step preparation: masked positions (the head gathers without a sync) and,
        # compiled and packed, the recipe's static shapes; masks of epoch 0 throughout
        prepare = StepPreparer(collator, max_length=args.max_seq_length, flop_counter=counter,
                               sparse_head=sparse, positions_multiple=shape.positions_multiple,
                               static=StaticShapes.for_run(mode_cfg, shape))
        out = []
        for _, (micro,) in (item for epoch in range(1000) for item in p.epoch(epoch)):
            # (the corpus is cycled: epochs 0, 1, ...)
            step = prepare([micro], DataPosition(), mask_epoch=0, fetch=examples.fetch)
            batch = step.micro_batches[0]
            batch["_flops"] = step.flops
            out.append(batch)
            if len(out) == n_steps:
                return out
        raise SystemExit("corpus too small for --steps")  # not reached

    def hf_batches():
        # run_mlm_no_trainer --line_by_line: tokenized without padding (input_ids, attention_mask,
        # special_tokens_mask), random batches, DataCollatorForLanguageModeling pads them.
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
        rng = np.random.default_rng(0)
        order = np.concatenate([rng.permutation(len(examples))
                                for _ in range(-(-n_steps * args.batch_size // len(examples)))])
        out = []
        for s in range(n_steps):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            feats = [{"input_ids": e["input_ids"], "special_tokens_mask": e["special_tokens_mask"],
                      "attention_mask": [1] * len(e["input_ids"])} for e in examples.fetch(idx)]
            batch = dict(collator(feats))
            batch["_real"] = sum(len(f["input_ids"]) for f in feats)
            batch["_flops"] = counter.step_flops([len(f["input_ids"]) for f in feats],
                                                 int((batch["labels"] != -100).sum()), False)
            out.append(batch)
        return out

    rows = args.packed_rows or args.batch_size
    padded = dict(per_device_batch_size=args.batch_size)
    packed = dict(per_device_batch_size=rows, pack_capacity=args.max_seq_length)
    builders = {  # name -> (batches, sparse head, the HF step)
        "hf_baseline": lambda: (hf_batches(), False, True),
        "padded": lambda: (mlmkit_batches("longest", plan(**padded), False), False, False),
        "padded_sparse": lambda: (mlmkit_batches("longest", plan(**padded), True), True, False),
        "group_by_length": lambda: (mlmkit_batches("longest", plan(**padded, group_by_length=True),
                                                   True), True, False),
        "packed": lambda: (mlmkit_batches("packed", plan(**packed), False), False, False),
        "packed_sparse": lambda: (mlmkit_batches("packed", plan(**packed), True), True, False),
    }
    results = []
    for name in args.modes.split(","):
        model.load_state_dict(initial)  # every mode starts from the same weights
        # the baseline: the model as transformers runs it (SDPA), not mlmkit's packed attention
        if attn == PACKED:
            model.set_attn_implementation("sdpa" if name == "hf_baseline" else PACKED)
        if name == "recipe":
            res = run_recipe_step(model, cfg, tokenizer, examples, n_steps, device, args)
        else:
            batches, sparse, hf = builders[name]()
            real = [b.pop("_real") if hf else int(b["num_real_tokens"]) for b in batches]
            flops = [b.pop("_flops") for b in batches]
            res = run_mode(name, model, batches, real, flops, device, args, sparse=sparse, hf=hf)
        results.append(res)
        print(f"  {name:16s} {res['real_tokens_per_s']:9.0f} real tok/s", flush=True)

    base = next((r for r in results if r["mode"] == "hf_baseline"), results[0])
    inner = next((r for r in results if r["mode"] == "packed_sparse"), None)
    device_name = (torch.cuda.get_device_name() if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads)")
    peak = args.peak_tflops or (peak_tflops(device_name, args.bf16) if device.type == "cuda"
                                else None)
    for r in results:
        r["ratio_vs_baseline"] = r["real_tokens_per_s"] / base["real_tokens_per_s"]
        r["mfu"] = r["tflops"] / peak if peak else None
        r["ratio_vs_packed_sparse"] = (r["real_tokens_per_s"] / inner["real_tokens_per_s"]
                                       if inner else None)

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)
    header = ("| mode | real tokens/s | all positions/s | pad fraction | ms/step | TFLOP/s | MFU | "
              "peak mem (GB) | × baseline | × packed_sparse |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {r['mode']} | {r['real_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
        f"{r['pad_fraction']:.3f} | {r['ms_per_step']:.1f} | {r['tflops']:.2f} | "
        f"{fmt(r['mfu'], '.1%')} | {fmt(r['peak_mem_gb'], '.2f')} | "
        f"{r['ratio_vs_baseline']:.2f} | {fmt(r['ratio_vs_packed_sparse'], '.2f')} |"
        for r in results]
    what = (f"{args.shape} shape (random init)" if args.shape else
            cfg.model_name_or_path or "all-MiniLM-L6-v2 (embedded)")
    print(f"\n{device_name}; model {what}, "
          f"batch {args.batch_size} (packed: {rows} rows of {args.max_seq_length}), "
          f"{args.steps} timed steps, attn {attn}, "
          f"{'bf16' if args.bf16 else 'fp32'}{', torch.compile' if args.torch_compile else ''}, "
          f"peak {fmt(peak, '.0f')} TFLOP/s\n")
    print("\n".join(lines))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "peak_tflops": peak, "args": vars(args),
                               "results": results, "table": "\n".join(lines)}, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
