"""The compiled (graphed) training step's static shapes, and the BERT family's variable-length
packed path (its `packed.PackedPath` receives rows `varlen`: CUDA), checked here through its CPU
fallback: SDPA under the block mask built from the boundaries, the same math as the CUDA kernel.

* `prefetch.StaticShapes`: every micro-batch of a compiled packed run has one shape (short
  micro-batches get empty rows; masked positions and boundaries are padded to the run's
  capacities, never cut), and keeps every target;
* the compiled forward is one graph and does not recompile across steps (dynamo's counters);
* BERT under mlmkit's registered attention: the boundaries reach the attention function through
  BertModel (without them the examples of a row would see each other), padded boundaries change
  nothing, and the start-up probe proves isolation on that path.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import tiny_model

from mlmkit.batch.collator import MaskedLMCollator, model_inputs
from mlmkit.batch.layout import pack_rows
from mlmkit.config.parse import parse_config
from mlmkit.config.shape import run_shape
from mlmkit.model.checks import position_offset
from mlmkit.model.loading import MaskedLMModule, attn_implementation
from mlmkit.model.packed import use_packed_path
from mlmkit.train.steps import StaticShapes, add_masked_positions


def examples(tokenizer, n: int, seed: int, longest: int = 14) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [tokenizer.cls_token_id]
             + [rng.randrange(1000, 2000) for _ in range(rng.randrange(2, longest))]
             + [tokenizer.sep_token_id], "idx": i} for i in range(n)]


def packed_batch(tokenizer, model, items, static: StaticShapes | None, width: int = 32,
                 mlm_probability: float = 0.3) -> dict:
    collator = MaskedLMCollator(tokenizer, padding="packed", max_length=width,
                                pad_to_multiple_of=width, mlm_probability=mlm_probability,
                                seed=0, position_offset=position_offset(model),
                                attn_implementation=attn_implementation(model))
    rows = pack_rows([len(e["input_ids"]) for e in items], width)
    if static is None:
        return add_masked_positions(collator(items, rows=rows))
    return static.fix(collator(items, rows=static.fill_rows(rows)))


def shapes(batch: dict) -> dict:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------ static shapes
def test_static_shapes_are_only_on_for_compiled_packed_runs():
    cfg = parse_config(["--torch_compile", "true", "--per_device_train_batch_size", "256",
                        "--max_seq_length", "128"])
    static = StaticShapes.for_run(cfg, run_shape(cfg, num_processes=1, on_gpu=False,
                                                 padding="packed"))
    # 256 x 128 tokens at 15% = 4915 expected targets: room for a quarter more, a multiple of 256
    assert static == StaticShapes(rows=256, width=128, masked=6400, segments=2368)
    assert StaticShapes.for_run(cfg, run_shape(cfg, num_processes=1, on_gpu=False,
                                               padding="longest")) is None
    eager = parse_config(["--per_device_train_batch_size", "256"])
    assert StaticShapes.for_run(eager, run_shape(eager, num_processes=1, on_gpu=False,
                                                 padding="packed")) is None


@pytest.mark.parametrize("varlen", [False, True])
def test_every_micro_batch_has_the_runs_shape_and_keeps_its_targets(tokenizer, varlen):
    model = tiny_model("bert", len(tokenizer), tokenizer.pad_token_id)
    use_packed_path(model, varlen=varlen)
    static = StaticShapes(rows=4, width=32, masked=256, segments=64)
    seen = set()
    for n, seed in ((9, 0), (7, 1), (2, 2), (1, 3)):  # full, short, one row, one example
        items = examples(tokenizer, n, seed)
        batch = packed_batch(tokenizer, model, items, static)
        seen.add(tuple(sorted(shapes(batch).items())))
        targets = (batch["labels"].flatten() != -100).nonzero().squeeze(1)
        kept = batch["masked_positions"][batch["masked_positions"] < batch["labels"].numel()]
        assert torch.equal(kept, targets) and len(targets) > 0  # every target, once, in order
        assert batch["input_ids"].shape == (4, 32)
        if varlen:
            assert batch["max_length_q"] == batch["max_length_k"] == 32
            assert len(batch["cu_seq_lens_q"]) == 64 and batch["cu_seq_lens_q"][-1] == 4 * 32
    assert len(seen) == 1, seen


def test_a_capacity_is_exceeded_by_growing_not_by_dropping(tokenizer):
    model = tiny_model("bert", len(tokenizer), tokenizer.pad_token_id)
    use_packed_path(model, varlen=True)
    static = StaticShapes(rows=4, width=32, masked=8, segments=4)  # far too small
    batch = packed_batch(tokenizer, model, examples(tokenizer, 9, 0), static, mlm_probability=0.5)
    n_targets = int((batch["labels"] != -100).sum())
    assert n_targets > 8
    assert len(batch["masked_positions"]) == 256  # the next multiple of 256
    assert len(batch["cu_seq_lens_q"]) == 64  # the next multiple of 64
    assert int((batch["masked_positions"] < batch["labels"].numel()).sum()) == n_targets


# ------------------------------------------------------------------------------ BERT, varlen path
def loss_of(model, batch) -> tuple[float, int]:
    with torch.no_grad():
        loss, count = MaskedLMModule(model)(**model_inputs(batch))
    return float(loss), int(count)


def hidden(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in model_inputs(batch).items() if k not in ("labels",
                                                                       "masked_positions")}
    with torch.no_grad():
        return model.base_model(**inputs).last_hidden_state  # (R, T, H)


def test_bert_boundaries_reach_the_attention_function(tokenizer):
    """The varlen path (CPU: its SDPA fallback) gives the block mask's loss; the same batch
    without its boundaries (the 2-D all-ones mask alone) lets the examples of a row see each
    other and moves the loss: the boundaries did reach the attention, through BertModel."""
    dense = tiny_model("bert", len(tokenizer), tokenizer.pad_token_id)
    varlen = tiny_model("bert", len(tokenizer), tokenizer.pad_token_id)
    assert use_packed_path(dense) is None and attn_implementation(dense) == "sdpa"
    assert use_packed_path(varlen, varlen=True) == "attention"
    assert attn_implementation(varlen) == "mlmkit_packed"
    items = examples(tokenizer, 9, 0)
    block = packed_batch(tokenizer, dense, items, None)
    bounds = packed_batch(tokenizer, varlen, items, None)
    rows = block["input_ids"].shape[0]
    assert rows < len(items)  # rows really hold several examples
    assert block["attention_mask"].shape == (rows, 1, 32, 32)
    assert bounds["attention_mask"].shape == (rows, 32) and bool(bounds["attention_mask"].all())
    (want, n), (got, m) = loss_of(dense, block), loss_of(varlen, bounds)
    assert n == m > 0 and abs(got - want) <= 1e-4 * abs(want)
    static = StaticShapes(rows=6, width=32, masked=256, segments=128)  # + 2 empty rows, padded
    padded = packed_batch(tokenizer, varlen, items, static)
    assert len(padded["cu_seq_lens_q"]) == 128
    assert abs(loss_of(varlen, padded)[0] - want) <= 1e-4 * abs(want)
    leaky = {k: v for k, v in bounds.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    real = bounds["labels"] != -100  # (R, T) positions that matter
    moved = (hidden(varlen, leaky) - hidden(varlen, bounds))[real].abs().max()
    assert moved > 1e-2, moved  # the boundaries were what kept the examples apart


def test_the_probe_proves_isolation_on_the_bert_varlen_path(tokenizer):
    from mlmkit.model.probe import probe_isolation
    model = tiny_model("bert", len(tokenizer), tokenizer.pad_token_id)
    use_packed_path(model, varlen=True)
    module = MaskedLMModule(model)
    result = probe_isolation(model, tokenizer, attn_implementation=attn_implementation(model),
                             position_offset=position_offset(model), max_length=128,
                             head_logits=module.head_logits)
    assert result.attn_implementation == "mlmkit_packed"
    assert result.packed_isolated and result.padded_isolated, result


def test_load_model_takes_the_varlen_path_on_cuda_only(tiny_bert_dir, tokenizer_path):
    from mlmkit.model.checks import load_tokenizer
    from mlmkit.model.loading import load_model
    cfg = parse_config(["--config_name", tiny_bert_dir, "--tokenizer_name", tokenizer_path])
    tok = load_tokenizer(cfg)
    assert attn_implementation(load_model(cfg, tok, device=torch.device("cpu"))) == "sdpa"
    assert attn_implementation(load_model(cfg, tok, device="cuda")) == "mlmkit_packed"
    named = parse_config(["--config_name", tiny_bert_dir, "--tokenizer_name", tokenizer_path,
                          "--attn_implementation", "sdpa"])
    assert attn_implementation(load_model(named, tok, device="cuda")) == "sdpa"  # the user's


# ------------------------------------------------------------------------------ one graph
@pytest.mark.parametrize("varlen", [False, True])
def test_the_compiled_forward_is_one_graph_without_recompiles(tokenizer, varlen):
    """Four steps of different content (row fill, targets, segments) through the compiled
    training forward (dynamo with the eager backend: the graph capture, fast on CPU): one graph,
    no graph break, no recompile, the eager losses."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    model = tiny_model("bert", len(tokenizer), tokenizer.pad_token_id)
    use_packed_path(model, varlen=varlen)
    model.train()
    module = MaskedLMModule(model)
    static = StaticShapes(rows=4, width=32, masked=256, segments=64)
    batches = [packed_batch(tokenizer, model, examples(tokenizer, n, seed), static)
               for n, seed in ((9, 0), (7, 1), (2, 2), (8, 3))]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in batches:
            inputs = model_inputs(batch)
            want, n = module(**inputs)
            got, m = compiled(**inputs)
            got.backward()
            assert int(m) == int(n) and abs(float(got.detach()) - float(want)) <= 1e-5 * float(want)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
