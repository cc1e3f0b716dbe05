"""Token-weighted evaluation and the padding-sensitivity probe.

* ``eval/loss``: mean MLM loss over every masked token of the validation split (summed over all
  batches and processes, then divided by the total count — not a mean of batch means). Eval
  always pads dynamically with the attention mask, whatever the training padding mode, so every
  run (every ablation arm) is scored the same way. Eval masks are fixed once: they depend on a
  constant seed and the example index, not on the run's seed, so all runs score the same targets.
  The eval masking rate is ``--eval_mlm_probability`` (default 0.15), independent of the training
  rate, so a run trained at 30% is scored on the usual 15%.
* ``eval/loss_unmasked``: the same batches with the attention mask withheld (padding attended).
* ``eval/pad_sensitivity``: mean |log p(token) alone - log p(token) padded to max_seq_length with
  no mask| over the real positions of a fixed set of validation examples (unmasked inputs). Zero
  for a model that ignores padding; it measures how much attended padding moves predictions.
* ``eval/probe_accuracy`` (``--probe_file``) and ``eval/pseudo_perplexity``
  (``--pseudo_perplexity_examples``): what the model is good for beyond the eval masks
  (`downstream.Downstream`, run after the loss at every eval).
"""

from __future__ import annotations

import torch
from accelerate.utils import send_to_device

from mlmkit.batch.collator import MaskedLMCollator, drop_targets, model_inputs
from mlmkit.data.plans import eval_plan
from mlmkit.model.loading import token_logprobs
from mlmkit.train.downstream import Downstream
from mlmkit.train.metrics import perplexity
from mlmkit.train.tracking import (
    EVAL_LOSS,
    EVAL_LOSS_UNMASKED,
    EVAL_PAD_SENSITIVITY,
    EVAL_PERPLEXITY,
    EVAL_PROBE_ACCURACY,
    EVAL_PROBE_ACCURACY_UNMASKED,
    EVAL_PSEUDO_PERPLEXITY,
    main_print,
    probe_key,
)

EVAL_MASK_SEED = 1234
EVAL_MASK_EPOCH = 0
PAD_PROBE_EXAMPLES = 32
# the downstream metrics of the eval line, as it names them
DOWNSTREAM_LINE = ((EVAL_PROBE_ACCURACY, "probe accuracy", 3),
                   (EVAL_PROBE_ACCURACY_UNMASKED, "unmasked", 3),
                   (EVAL_PSEUDO_PERPLEXITY, "pseudo-perplexity", 2))


def eval_collator(tokenizer, cfg, position_offset: int = 0,
                  attn_implementation: str | None = None) -> MaskedLMCollator:
    """Eval pads dynamically (whatever the training padding) with masks fixed once, at the eval
    masking rate (``cfg.eval_mlm_probability``)."""
    collator = MaskedLMCollator.from_config(tokenizer, cfg, position_offset=position_offset,
                                            attn_implementation=attn_implementation,
                                            padding="longest", seed=EVAL_MASK_SEED,
                                            mlm_probability=cfg.eval_mlm_probability)
    collator.set_epoch(EVAL_MASK_EPOCH)
    return collator


@torch.no_grad()
def evaluate(accelerator, module, examples, collator, *, batch_size: int, max_seq_length: int,
             with_unmasked: bool = True, with_pad_probe: bool = True) -> dict:
    """Evaluate on ``examples`` (an IndexedExamples); every process must call it."""
    module.eval()
    device = accelerator.device
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, loss unmasked, masked count
    plan = eval_plan(len(examples), batch_size, accelerator.num_processes, accelerator.process_index)
    for indices in plan:
        batch = collator(examples.fetch(indices or [0]))
        if not indices:  # this process ran out of examples
            drop_targets(batch)
        batch = send_to_device(batch, device)
        loss_sum, count = module(**model_inputs(batch, mask_padding=True))
        sums[0] += loss_sum.double()
        sums[2] += count.double()
        if with_unmasked:
            sums[1] += module(**model_inputs(batch, mask_padding=False))[0].double()
    sums = accelerator.reduce(sums, "sum")
    count = max(sums[2].item(), 1.0)
    loss = sums[0].item() / count
    metrics = {EVAL_LOSS: loss, EVAL_PERPLEXITY: perplexity(loss)}
    if with_unmasked:
        metrics[EVAL_LOSS_UNMASKED] = sums[1].item() / count
    if with_pad_probe:
        metrics[EVAL_PAD_SENSITIVITY] = pad_sensitivity(
            accelerator.unwrap_model(module).model, examples, collator, max_seq_length, device)
    module.train()
    return metrics


@torch.no_grad()
def pad_sensitivity(model, examples, collator, max_seq_length: int, device) -> float:
    """Mean |Δ log p| between each probe example alone and padded to max_seq_length, unmasked.

    Every process runs the same probe (the same forwards, as ZeRO-3 requires) and gets the same
    value.
    """
    n = min(PAD_PROBE_EXAMPLES, len(examples))
    items = examples.fetch(range(n))
    pad_id = collator.tokenizer.pad_token_id
    padded = torch.full((n, max_seq_length), pad_id, dtype=torch.long)  # (N, T_max)
    alone = []
    for i, item in enumerate(items):
        ids = torch.tensor(item["input_ids"][:max_seq_length], dtype=torch.long)  # (L,)
        padded[i, :len(ids)] = ids
        alone.append(token_logprobs(model, ids[None].to(device))[0])  # (L,)
    with_pad = token_logprobs(model, padded.to(device))  # (N, T_max), no attention mask
    diffs = torch.cat([(with_pad[i, :len(a)] - a).abs() for i, a in enumerate(alone)])
    return diffs.mean().item()


class Evaluator:
    """The run's eval: `evaluate` on the validation examples with `eval_collator`'s fixed
    masks, then the downstream measures (`downstream.Downstream`: ``probe_sets``, a list of
    `probe_file.ProbeSet`, and ``--pseudo_perplexity_examples``), logged at a step
    (`tracking.MetricsLog`) with one line; every process calls it. ``training``: a
    `optim.Training`."""

    def __init__(self, accelerator, training, examples, tokenizer, cfg, metrics_log,
                 probe_sets=()):
        self.accelerator, self.module, self.examples = accelerator, training.module, examples
        self.collator = eval_collator(tokenizer, cfg, position_offset=training.position_offset,
                                      attn_implementation=training.attn_implementation)
        self.cfg, self.metrics_log = cfg, metrics_log
        self.downstream = Downstream(accelerator, training.module, self.collator, cfg,
                                     probe_sets, examples)

    def __call__(self, step: int) -> dict:
        cfg = self.cfg
        metrics = evaluate(self.accelerator, self.module, self.examples, self.collator,
                           batch_size=cfg.per_device_eval_batch_size,
                           max_seq_length=cfg.max_seq_length,
                           with_unmasked=cfg.eval_pad_sensitivity,
                           with_pad_probe=cfg.eval_pad_sensitivity)
        metrics.update(self.downstream())
        self.metrics_log.log(metrics, step)
        line = f"eval @ step {step}: loss {metrics[EVAL_LOSS]:.4f}, " \
               f"perplexity {metrics[EVAL_PERPLEXITY]:.2f}"
        for key, name, digits in DOWNSTREAM_LINE:
            for probe in self.downstream.probes if key != EVAL_PSEUDO_PERPLEXITY else [None]:
                named = probe_key(key, probe.name) if probe is not None else key
                if named in metrics:
                    label = name if probe is None or probe.name is None else f"{name} {probe.name}"
                    line += f", {label} {metrics[named]:.{digits}f}"
        if self.downstream.enabled:
            line += f" (downstream {self.downstream.seconds:.1f} s)"
        main_print(self.accelerator)(line)
        return metrics
