"""Correctness checks of the fast GPU path that need a CUDA device, each writing one JSON file:

    python benchmarks/gpu_checks.py varlen  MODEL_DIR OUT.json   # varlen == dense block mask
    python benchmarks/gpu_checks.py graphed MODEL_DIR OUT.json   # graphed step == eager step
    python benchmarks/gpu_checks.py sync    MODEL_DIR OUT.json   # no sync in the step, no pytest

* ``varlen``: packed BERT rows in bf16 (autocast), the variable-length kernel
  (`attention.packed_attention_forward` on CUDA, mlmkit's registered attention) against SDPA
  under the dense (R, 1, T, T) block mask, both against an fp32 block-mask reference: hidden
  states of the real tokens, the loss and the gradient; with the boundaries as collated and as a
  compiled run pads them (`steps.StaticShapes`: zero-length segments at the end,
  ``max_length`` = the row width) -- the assumptions the CPU tests cannot check. Also times one
  forward+backward of each (informative).
* ``graphed``: a few steps of the recipe's own steps (its `steps.RunSteps` and `loop.Stepper`,
  bf16 mixed precision, dropout off, gradient accumulation over 2 micro-batches) eager and with
  ``--torch_compile true --torch_compile_mode reduce-overhead`` (static shapes, CUDA graphs, the
  varlen path) from the same weights: the per-step losses within bf16 tolerance.
* ``sync``: the recipe's `loop.Stepper` under CUDA's sync debug mode, which raises at any
  host-device synchronisation (`sync.steps_without_sync`, what the step tests run on CUDA), with
  the block mask, varlen and graphed.

Without CUDA each writes ``{"skipped": ...}`` and exits 0 (the CPU dry run of
benchmarks/gpu.sh). A failed check exits 1 with ``"ok": false`` and its numbers.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mlmkit.config.parse import parse_config  # noqa: E402
from mlmkit.data.corpus import IndexedExamples, load_raw_datasets, tokenize_datasets  # noqa: E402
from mlmkit.model.checks import load_tokenizer  # noqa: E402
from mlmkit.model.loading import load_model  # noqa: E402
from mlmkit.train.checkpoint import TrainState  # noqa: E402
from mlmkit.train.loop import Stepper  # noqa: E402
from mlmkit.train.optim import prepare_training  # noqa: E402
from mlmkit.train.steps import Prefetcher, RunSteps  # noqa: E402
from mlmkit.train.sync import steps_without_sync, take_steps  # noqa: E402

# GPU_CHECKS_ON_CPU=1 runs the checks on the CPU (debugging the script itself; the results there
# say nothing about the GPU kernels)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance of ``a`` from ``b`` (fp32)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def packed_examples(tokenizer, n: int, seed: int = 0, longest: int = 100) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        body = torch.randint(1000, len(tokenizer) - 1, (int(torch.randint(3, longest, (1,),
                                                                        generator=g)),),
                             generator=g).tolist()
        out.append({"input_ids": [tokenizer.cls_token_id, *body, tokenizer.sep_token_id],
                    "idx": i})
    return out


def check_varlen(model_dir: str, rows: int = 64, width: int = 128) -> dict:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlmkit.batch.collator import MaskedLMCollator, model_inputs
    from mlmkit.batch.layout import pack_rows
    from mlmkit.model.attention import varlen_available
    from mlmkit.model.loading import MaskedLMModule, attn_implementation
    from mlmkit.model.packed import use_packed_path
    from mlmkit.train.steps import StaticShapes
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForMaskedLM.from_pretrained(model_dir, attn_implementation="sdpa").to(DEV)
    varlen = AutoModelForMaskedLM.from_pretrained(model_dir).to(DEV)
    assert use_packed_path(varlen, varlen=True) == "attention"
    for m in (dense, varlen):
        m.eval()  # no dropout: the same function
    items = packed_examples(tokenizer, rows * 3)
    plan = pack_rows([len(e["input_ids"]) for e in items], width)[:rows]
    items = [items[i] for row in plan for i in row]
    starts = [0]
    for row in plan:
        starts.append(starts[-1] + len(row))
    plan = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]

    def collate(model, static=None):
        collator = MaskedLMCollator(tokenizer, padding="packed", max_length=width,
                                    pad_to_multiple_of=width, seed=0,
                                    attn_implementation=attn_implementation(model))
        batch = collator(items, rows=static.fill_rows(plan) if static else plan)
        if static:
            static.fix(batch)
        return {k: v.to(DEV) if isinstance(v, torch.Tensor) else v
                for k, v in model_inputs(batch).items()}

    static = StaticShapes(rows=rows + 2, width=width, masked=round(rows * width * 0.25) // 256
                          * 256 + 256, segments=(rows + 2) * (width // 16 + 1) + 1)
    batches = {"block": collate(dense), "varlen": collate(varlen),
               "varlen_static": collate(varlen, static)}
    n_segments = len(batches["varlen"]["cu_seq_lens_q"]) - 1
    real = batches["block"]["labels"] != -100  # (R, T) the targets: positions that matter

    def run(model, batch, bf16: bool, train: bool = False):
        model.train(train)
        model.zero_grad(set_to_none=True)
        module = MaskedLMModule(model)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "masked_positions")}
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=bf16):
            hidden = model.base_model(**inputs).last_hidden_state  # (R', T, H)
            loss, count = module(**batch)
        (loss / count).backward()
        grad = torch.cat([p.grad.flatten().float() for p in model.parameters()
                          if p.grad is not None])
        return hidden[:real.shape[0]][real].float(), float(loss / count), grad

    ref_h, ref_loss, ref_grad = run(dense, batches["block"], bf16=False)
    results = {"rows": rows, "width": width, "segments": n_segments,
               "static_segments": static.segments, "torch": torch.__version__,
               "varlen_kernel": varlen_available(torch.zeros(  # a query of the model's heads
                   1, 1, varlen.config.hidden_size // varlen.config.num_attention_heads,
                   device=DEV, dtype=torch.bfloat16)),
               "fp32_block_loss": ref_loss}
    for name, model in (("block", dense), ("varlen", varlen), ("varlen_static", varlen)):
        h, loss, grad = run(model, batches[name], bf16=True)
        results[name] = {"hidden_rel_err": rel(h, ref_h), "loss": loss,
                         "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
                         "grad_rel_err": rel(grad, ref_grad)}
    # training mode, attention dropout on (the flash op with dropout): a sane loss and gradient
    # (dropout masks differ between kernels: not equal, close), and the time of each path
    from mlmkit.model.attention import _DROPOUT_KERNEL
    results["dropout_kernel"] = _DROPOUT_KERNEL["ok"]
    for name, model in (("block", dense), ("varlen_static", varlen)):
        torch.manual_seed(0)
        _, loss, grad = run(model, batches[name], bf16=True, train=True)
        results[name].update(train_loss=loss, train_grad_rel_err=rel(grad, ref_grad),
                             train_grad_finite=bool(torch.isfinite(grad).all()))
        for i in range(13):  # informative timing, training mode
            if i == 3:
                sync()
                t0 = time.perf_counter()
            run(model, batches[name], bf16=True, train=True)
        sync()
        results[name]["ms_fwd_bwd"] = (time.perf_counter() - t0) * 100  # / 10 * 1000
    dropped, kept = results["varlen_static"], results["block"]
    results["dropout_ok"] = bool(dropped["train_grad_finite"] and abs(
        dropped["train_loss"] - kept["train_loss"]) <= 0.05 * abs(kept["train_loss"]) and
        dropped["train_grad_rel_err"] <= 2 * kept["train_grad_rel_err"] + 0.05)
    base = results["block"]
    results["ok"] = bool(results["varlen_kernel"]) and results["dropout_ok"] and all(
        results[n][k] <= 2 * base[k] + 2e-3 for n in ("varlen", "varlen_static")
        for k in ("hidden_rel_err", "loss_rel_err", "grad_rel_err"))
    return results


def recipe_steps(model_dir: str, flags: list[str], steps: int):
    """The recipe's own steps on ``model_dir`` (its assembly, `steps.RunSteps`, and its
    `loop.Stepper`), bf16, dropout off, each step 2 micro-batches of 16 rows (accumulation:
    gradients must not live in the graph's memory). -> ``(stepper, run_steps)``"""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    torch._dynamo.reset()
    cfg = parse_config(["--model_name_or_path", model_dir, "--padding", "packed",
                        "--max_seq_length", "128", "--per_device_train_batch_size", "16",
                        "--gradient_accumulation_steps", "2",
                        "--max_train_steps", str(steps), "--learning_rate", "1e-4",
                        "--max_train_samples", "4000", *flags])
    tokenizer = load_tokenizer(cfg)
    examples = IndexedExamples(tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)["train"])
    accelerator = Accelerator(mixed_precision="bf16", cpu=DEV == "cpu",
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    torch.manual_seed(0)
    model = load_model(cfg, tokenizer, device=accelerator.device)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the same function eager and compiled (their dropout RNGs differ)
    training = prepare_training(cfg, accelerator, model)
    run_steps = RunSteps.build(cfg, accelerator, training, tokenizer, examples, padding="packed")
    training.module.train()
    return Stepper(accelerator, training, run_steps.scheduler, cfg, TrainState()), run_steps


def recipe_losses(model_dir: str, flags: list[str], steps: int) -> tuple[list[float], str]:
    """Per-step losses of the recipe's own steps (`recipe_steps`), read once at the end."""
    stepper, run_steps = recipe_steps(model_dir, flags, steps)
    prefetcher = Prefetcher(run_steps.source(), num_workers=0)
    take_steps(stepper, prefetcher, steps)
    prefetcher.close()
    return [loss for loss, *_ in stepper.read()], stepper.training.attn_implementation


def check_graphed(model_dir: str, steps: int = 8) -> dict:
    t0 = time.perf_counter()
    eager, attn = recipe_losses(model_dir, [], steps)
    t1 = time.perf_counter()
    graphed, _ = recipe_losses(model_dir, ["--torch_compile", "true", "--torch_compile_mode",
                                           "reduce-overhead"], steps)
    t2 = time.perf_counter()
    errs = [abs(g - e) / abs(e) for g, e in zip(graphed, eager)]
    return {"attn_implementation": attn, "eager": eager, "graphed": graphed, "rel_err": errs,
            "eager_seconds": t1 - t0, "graphed_seconds": t2 - t1, "tolerance": 2e-2,
            "trained": abs(eager[-1] - eager[0]) / abs(eager[0]),
            "ok": len(errs) == steps and max(errs) <= 2e-2}


def check_sync(model_dir: str) -> dict:
    """No host-device synchronisation in the recipe's steps (tests/unit/train/test_step_sync.py's
    CUDA check, here on ``model_dir``'s model, without pytest where the GPU image has none): its
    `loop.Stepper` under CUDA's sync debug mode (`sync.steps_without_sync`, the busy clock's
    calibration included) with the block mask, varlen and graphed; each variant's outcome."""
    results = {}
    for path, flags in (("block_mask", ("--attn_implementation", "sdpa")), ("varlen", ()),
                        ("graphed", ("--torch_compile", "true", "--torch_compile_mode",
                                     "reduce-overhead"))):
        try:
            stepper, run_steps = recipe_steps(model_dir, list(flags), 12)
            prefetcher = Prefetcher(run_steps.source(), num_workers=2, pin_memory=DEV == "cuda")
            warmup = 3 if path == "graphed" else 1  # compilation and CUDA-graph recording sync
            try:
                rows = steps_without_sync(stepper, prefetcher, warmup=warmup)
            finally:
                prefetcher.close()
            calibrated = DEV != "cuda" or (stepper.clock.per_position or 0) > 0
            ok = len(rows) == 4 and all(masked > 0 for _, masked, _, _ in rows) and calibrated
            results[path] = "passed" if ok else f"FAILED: {len(rows)} steps read, " \
                f"busy clock per position {stepper.clock.per_position}"
        except BaseException as err:  # an assertion, or the sync-debug error
            results[path] = f"FAILED: {type(err).__name__}: {str(err)[:500]}"
    return {"variants": results, "ok": all(v == "passed" for v in results.values())}


def main() -> None:
    what, model_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    import os
    if DEV != "cuda" and not os.environ.get("GPU_CHECKS_ON_CPU"):
        write(out, {"check": what, "skipped": "needs a CUDA GPU"})
        print(f"gpu_checks {what}: skipped (no CUDA device)")
        return
    try:
        kwargs = {"rows": int(os.environ["GPU_CHECKS_ROWS"])} if what == "varlen" and \
            os.environ.get("GPU_CHECKS_ROWS") else {}
        result = {"varlen": check_varlen, "graphed": check_graphed,
                  "sync": check_sync}[what](model_dir, **kwargs)
    except Exception as err:  # the check itself failed: its error is the result
        import traceback
        result = {"ok": False, "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()[-4000:]}
    device = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (a dry run of the script)"
    result = {"check": what, "device": device, **result}
    write(out, result)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
