"""Isolation, proven on the model in hand: the start-up probe and what the run does with it.

The collator promises that padding is never attended and that packed examples never see each
other -- but whether the *model* keeps that promise depends on its architecture: convolutions
that span padding (ConvBERT), token mixing without attention (FNet), trigram input embeddings
that reach into the neighbouring example (MobileBERT), attention approximations (Nyströmformer,
MRA), or a mask path that cannot take a block-diagonal mask (DeBERTa, ESM, Longformer...).

`probe_isolation` runs a handful of short synthetic examples and one of up to 130 tokens
(ordinary vocabulary, fixed seed, the same on every process) through the actual model -- real weights, eval mode, no grad, the
collator's own layouts -- three ways: each example alone, all of them padded together with the
attention mask, and all of them packed into one row. An example's logits must not change:

    leak = max |logits(example in the batch) - logits(example alone)|   over real positions

Isolated means ``leak <= tolerance``, with ``tolerance = rtol * max(1, max |logits alone|)`` and
``rtol = max(1e-4, 8 * eps(dtype))`` (1e-4 in fp32; bf16 weights under DeepSpeed give a coarser
6e-2). A mode that crashes inside the model is not isolated either. The probe also checks the
masked-only head (`loading.MaskedLMModule`) against the full head on the same hidden states.

`resolve_padding` turns the result into the run's padding mode, or a one-line ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mlmkit.batch.collator import MaskedLMCollator, model_inputs
from mlmkit.batch.masking import VocabularyTables
from mlmkit.batch.rows import PackedRows
from mlmkit.config.errors import ConfigError
from mlmkit.config.keys import PADDING

PROBE_LENGTHS = (6, 11, 3, 9)  # ordinary tokens per example, before special tokens
# Plus one example of up to this many tokens (at most max_seq_length): long enough to reach past
# the local window of sliding-window layers (ModernBERT: 128 tokens, 64 each side), which a
# block-diagonal packed mask would otherwise widen to the whole example.
PROBE_LONG = 130
PROBE_SEED = 0


@dataclass
class IsolationResult:
    """What the probe measured on one model (leaks are None where the mode crashed)."""
    architecture: str
    attn_implementation: str
    tolerance: float
    padded_leak: float | None = None
    packed_leak: float | None = None
    padded_error: str | None = None
    packed_error: str | None = None
    sparse_head: bool | None = None   # masked-only head == full head (None: no known layout)

    @property
    def padded_isolated(self) -> bool:
        return self.padded_leak is not None and self.padded_leak <= self.tolerance

    @property
    def packed_isolated(self) -> bool:
        return self.packed_leak is not None and self.packed_leak <= self.tolerance

    def describe(self, mode: str) -> str:
        """``isolated (max |Δ logit| 1.5e-07)``, ``leaks (max |Δ logit| 0.16 > 1.0e-04)`` or
        ``crashes (RuntimeError: ...)``."""
        leak, error = (self.padded_leak, self.padded_error) if mode == "padded" else (
            self.packed_leak, self.packed_error)
        if error:
            return f"crashes ({error})"
        if leak is not None and leak <= self.tolerance:
            return f"isolated (max |Δ logit| {leak:.1e})"
        return f"leaks (max |Δ logit| {leak:.3g} > {self.tolerance:.1e})"

    def metrics(self) -> dict[str, Any]:
        """For summary.json and the trackers."""
        return {"probe/padded_leak": self.padded_leak, "probe/packed_leak": self.packed_leak,
                "probe/padded_isolated": self.padded_isolated,
                "probe/packed_isolated": self.packed_isolated,
                "probe/tolerance": self.tolerance, "probe/sparse_head": self.sparse_head,
                "probe/attn_implementation": self.attn_implementation}


def probe_examples(tokenizer, max_length: int | None = None) -> list[list[int]]:
    """Short examples of ordinary ids (fixed seed), and one of ``min(max_length, PROBE_LONG)``
    tokens, each wrapped in the tokenizer's special tokens."""
    ordinary = VocabularyTables(tokenizer).replacement_ids
    gen = torch.Generator().manual_seed(PROBE_SEED)
    first = [i for i in (tokenizer.cls_token_id, tokenizer.bos_token_id) if i is not None][:1]
    last = [i for i in (tokenizer.sep_token_id, tokenizer.eos_token_id) if i is not None][:1]
    lengths = list(PROBE_LENGTHS)
    if max_length is not None and max_length - 2 > max(lengths):
        lengths.append(min(max_length, PROBE_LONG) - 2)
    return [first + ordinary[torch.randint(len(ordinary), (n,), generator=gen)].tolist() + last
            for n in lengths]


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


class _ProbeForward:
    """The probe's batches (collated as the run collates, on its device) and the model's logits."""

    def __init__(self, model, tokenizer, *, max_length: int, device, position_offset: int,
                 attn_implementation: str):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_length, self.position_offset = max_length, position_offset
        self.attn_implementation = attn_implementation

    def collate(self, padding: str, items, rows=None) -> dict:
        collator = MaskedLMCollator(self.tokenizer, mlm=False, padding=padding,
                                    max_length=self.max_length,
                                    position_offset=self.position_offset,
                                    attn_implementation=self.attn_implementation)
        batch = model_inputs(collator(items, rows=rows))
        batch.pop("labels")
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def logits(self, batch) -> torch.Tensor:
        return self.model(**batch).logits.float()


@torch.no_grad()
def probe_isolation(model, tokenizer, *, attn_implementation: str, position_offset: int,
                    max_length: int | None = None, device=None,
                    head_logits=None) -> IsolationResult:
    """Measure on ``model`` whether padded (with the mask) and packed batches isolate examples.

    ``max_length`` (the run's max_seq_length) bounds the long probe example.
    ``head_logits(hidden) -> logits``, when given, is the masked-only head to check against the
    full head. Every process must call it (the same forwards everywhere, as ZeRO-3 requires).
    Restores the model's train/eval mode.
    """
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    examples = probe_examples(tokenizer, max_length)
    lengths = [len(e) for e in examples]
    dtype = next(model.parameters()).dtype
    rtol = max(1e-4, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4

    forward = _ProbeForward(model, tokenizer, max_length=sum(lengths), device=device,
                            position_offset=position_offset,
                            attn_implementation=attn_implementation)
    collate, logits = forward.collate, forward.logits
    result = IsolationResult(type(model).__name__, attn_implementation, tolerance=0.0)
    try:
        alone = [logits(collate("longest", [e]))[0] for e in examples]  # (L_i, V) each
    except Exception as err:  # the model cannot even run one example: both modes unusable
        result.padded_error = result.packed_error = "alone: " + _error(err)
        model.train(was_training)
        return result
    result.tolerance = rtol * max(1.0, max(float(a.abs().max()) for a in alone))
    try:
        batch = collate("longest", examples)
        out = logits(batch)  # (B, T, V)
        real = batch["attention_mask"].bool()  # (B, T): the real positions, in order
        result.padded_leak = max(float((out[i][real[i]] - a).abs().max())
                                 for i, a in enumerate(alone))
    except Exception as err:
        result.padded_error = _error(err)
    try:
        rows = [list(range(len(examples)))]  # one row of them all
        row = logits(collate("packed", examples, rows=rows))[0]  # (T, V)
        starts = PackedRows.lay_out(lengths, rows).start_of
        result.packed_leak = max(float((row[starts[i]:starts[i] + n] - alone[i]).abs().max())
                                 for i, n in enumerate(lengths))
    except Exception as err:
        result.packed_error = _error(err)
    if head_logits is not None:
        result.sparse_head = _head_matches(model, head_logits, collate("longest", [examples[1]]),
                                           alone[1], result.tolerance)
    model.train(was_training)
    return result


def _head_matches(model, head_logits, batch, full: torch.Tensor, tolerance: float) -> bool:
    """The masked-only head on the base model's hidden states gives the full head's logits."""
    try:
        hidden = model.base_model(**batch).last_hidden_state[0]  # (L, H)
        sparse = head_logits(hidden[1:-1]).float()  # (L-2, V): a subset of positions, as in use
    except Exception:
        return False
    return sparse.shape == full[1:-1].shape and float((sparse - full[1:-1]).abs().max()) <= tolerance


def resolve_padding(padding: str, result: IsolationResult, *, accept_padding_leak: bool = False,
                    group_by_length: bool = False) -> tuple[str, str]:
    """The padding mode this run uses, and one line saying why; ConfigError when the model
    cannot keep the isolation contract in the requested mode.

    ``auto`` takes ``packed`` where packing is proven isolated (and no length grouping was
    asked for), else ``longest``. Padded modes need padding isolated under the mask, unless
    ``accept_padding_leak`` says to train anyway.
    """
    arch = result.architecture
    if padding == "auto":
        if result.packed_isolated and not group_by_length:
            padding, why = "packed", "padding=auto -> packed: packed examples proven isolated"
        else:
            reason = ("--group_by_length asks for padded batches" if group_by_length else
                      f"packed rows are not isolated on {arch}: {result.describe('packed')}")
            padding, why = "longest", f"padding=auto -> longest: {reason}"
    elif padding == "packed" and not result.packed_isolated:
        raise ConfigError(
            f"padding=packed: packed examples are not isolated on {arch} "
            f"({result.describe('packed')}), so they would see each other. Fix: use "
            "--padding longest (or auto, which picks it for this model).")
    else:
        why = f"padding={padding}"
    if padding != "packed" and not result.padded_isolated:
        message = (f"{arch} is not isolated from padding even with the attention mask "
                   f"({result.describe('padded')})")
        if not accept_padding_leak or result.padded_error:
            fix = ("this model cannot run padded batches" if result.padded_error else
                   "train on fixed-length blocks (--line_by_line false: no padding but the last "
                   "block), or pass --accept_padding_leak true to train anyway")
            raise ConfigError(f"padding={padding}: {message}. Fix: {fix}.")
        why += f"; WARNING: {message}, accepted by --accept_padding_leak"
    return padding, why


@dataclass
class PaddingDecision:
    """The run's padding mode, the probe it rests on, and the lines that say so."""
    padding: str
    isolation: IsolationResult
    lines: list[str]

    def summary(self) -> dict:
        """The summary's entries: what ``--padding`` resolved to and the probe's measurements."""
        return {PADDING: self.padding, **self.isolation.metrics()}

    def run_config(self) -> dict:
        """What the trackers' run config records beside the flags."""
        return {PADDING + "_resolved": self.padding, **self.isolation.metrics()}


def decide_padding(cfg, training, tokenizer, device) -> PaddingDecision:
    """Probe ``training``'s model (a `optim.Training`; every process, same forwards) and resolve
    ``--padding`` (`resolve_padding`: a ConfigError before anything is written); a model whose
    masked-only head does not match its full head falls back to the full head."""
    inner = training.inner
    isolation = probe_isolation(inner.model, tokenizer,
                                attn_implementation=training.attn_implementation,
                                position_offset=training.position_offset,
                                max_length=cfg.max_seq_length, device=device,
                                head_logits=inner.head_logits if inner.sparse_prediction else None)
    padding, why = resolve_padding(cfg.padding, isolation, group_by_length=cfg.group_by_length,
                                   accept_padding_leak=cfg.accept_padding_leak)
    lines = [f"isolation probe ({isolation.architecture}, {training.attn_implementation}): "
             f"padded {isolation.describe('padded')}; packed {isolation.describe('packed')}; "
             f"{why}"]
    if cfg.sparse_prediction and not isolation.sparse_head:
        inner.sparse_prediction = False
        lines.append(f"notice: {isolation.architecture} has no masked-only head layout that "
                     "matches its full head; using the full head.")
    return PaddingDecision(padding, isolation, lines)
