"""What the model is good for beside its MLM loss, measured at every eval (`evaluation.Evaluator`):

* ``eval/probe_accuracy`` (``--probe_file``): each labelled text embedded by the model being
  trained -- the mean of its base encoder's last hidden states over the text's tokens (special
  tokens included, padding not), the text padded with the attention mask as users run the model
  -- and a logistic regression on the standardized embeddings, cross-validated over
  ``--probe_folds`` stratified folds (shuffled with the fixed `PROBE_SEED`, so every run of an
  ablation is scored on the same folds): the mean accuracy over the folds, and its std
  (``eval/probe_accuracy_std``). ``--probe_mask_padding false`` (or ``both``) also embeds the
  texts the way the ablation's unmasked arm trains, the attention mask withheld
  (`collator.model_inputs` with ``mask_padding=False``): ``eval/probe_accuracy_unmasked`` (and
  its std). Masked, a text's embedding does not depend on its batch, so those batches are
  sorted by length (less padding, same result); unmasked, it does, so they follow the file's
  order, as a shuffled training batch would. Several files (``--probe_file A B``): one probe
  each, named by the file's stem (`keys.probe_key`: ``eval/probe_accuracy/<stem>`` and so on).
* ``eval/pseudo_perplexity`` (``--pseudo_perplexity_examples N``, Salazar et al., 2020): every
  real, non-special token of the first N validation examples masked in turn, one copy of the
  example per token, the copies run in batches of ``--per_device_eval_batch_size``; exp of the
  mean of -log p(original token) over all of them. It depends on no eval masks.

Every process takes part in every forward (ZeRO-3 and FSDP gather parameters collectively): the
batches are dealt out round-robin, a process with none left runs a zero-weight dummy, and the
results are summed across processes. The probe is fitted on the main process and its two numbers
broadcast, so every process returns the same metrics.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, send_to_device

from mlmkit.batch.collator import drop_targets, model_inputs
from mlmkit.config.keys import (
    EVAL_PROBE_ACCURACY,
    EVAL_PROBE_ACCURACY_STD,
    EVAL_PROBE_ACCURACY_UNMASKED,
    EVAL_PROBE_ACCURACY_UNMASKED_STD,
    EVAL_PSEUDO_PERPLEXITY,
    probe_key,
)
from mlmkit.data.plans import eval_plan
from mlmkit.data.probe_file import probe_name

PROBE_SEED = 1234      # the folds' shuffle: the same folds for every run
PROBE_MAX_ITER = 1000  # logistic regression (lbfgs) iterations
# --probe_mask_padding -> the arms embedded (mask_padding) and their metric names
PROBE_ARMS = {True: (EVAL_PROBE_ACCURACY, EVAL_PROBE_ACCURACY_STD),
              False: (EVAL_PROBE_ACCURACY_UNMASKED, EVAL_PROBE_ACCURACY_UNMASKED_STD)}
ARMS_OF = {"true": (True,), "false": (False,), "both": (True, False)}


def probe_accuracy(features, labels, folds: int, seed: int = PROBE_SEED) -> tuple[float, float]:
    """(mean, std) over ``folds`` stratified, shuffled (``seed``) folds of the accuracy of a
    logistic regression on standardized ``features`` (N, H) predicting ``labels`` (N,)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITER))
    # One BLAS thread: the fit is small (about 0.4 s for 2,000 x 384 on one core), and BLAS
    # threads that spin beside other busy processes made it 50 times slower on a shared CPU.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # an unconverged fold still scores
        scores = cross_val_score(probe, np.asarray(features, dtype=np.float64), np.asarray(labels),
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return float(scores.mean()), float(scores.std())


def _my_batches(n_batches: int, accelerator) -> list[int | None]:
    """This process's batch numbers, round-robin (`plans.eval_plan` over batches); None: a dummy.
    Every process gets the same count."""
    plan = eval_plan(n_batches, 1, accelerator.num_processes, accelerator.process_index)
    return [batch[0] if batch else None for batch in plan]


def _padded(layout, rows: list[list[int]], labels: list[list[int]] | None = None) -> dict:
    """``rows`` of token ids as one batch by the eval collator's `layout.Layout` (padded, the
    attention mask from the lengths); ``labels`` the same shape, -100 where None."""
    ids = torch.tensor([t for row in rows for t in row], dtype=torch.long)  # (N,)
    flat = torch.full_like(ids, -100) if labels is None else \
        torch.tensor([t for row in labels for t in row], dtype=torch.long)  # (N,)
    return layout(ids, flat, [len(row) for row in rows])


@torch.no_grad()
def embed(accelerator, module, token_ids: list[list[int]], layout, *, batch_size: int,
          mask_padding: bool = True, order: list[int] | None = None) -> torch.Tensor:
    """The texts' embeddings (N, H) fp32 on every process: the mean of the base encoder's last
    hidden states over each text's tokens, the batch run with its attention mask
    (``mask_padding``) or without it. ``order``: the texts' order into batches of
    ``batch_size`` (default: as given). Every process must call it (`_my_batches`)."""
    model = accelerator.unwrap_model(module).model.base_model
    order = list(range(len(token_ids))) if order is None else order
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    out = None
    for number in _my_batches(len(batches), accelerator):
        texts = batches[0 if number is None else number]
        batch = send_to_device(_padded(layout, [token_ids[i] for i in texts]), accelerator.device)
        inputs = {k: v for k, v in model_inputs(batch, mask_padding).items() if k != "labels"}
        hidden = model(**inputs).last_hidden_state.float()  # (B, T, H)
        if out is None:
            out = torch.zeros(len(token_ids), hidden.shape[-1], device=hidden.device)
        if number is None:  # a dummy: the forward only
            continue
        real = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1): the tokens
        out[torch.tensor(texts, device=hidden.device)] = (hidden * real).sum(1) / real.sum(1)
    return accelerator.reduce(out, "sum")  # each row filled by one process, zeros elsewhere


def single_mask_copies(input_ids, is_special, mask_token_id: int):
    """(copies, labels): one copy of ``input_ids`` per real non-special position (``is_special``
    False), that token replaced by ``mask_token_id`` and its label the original, -100
    elsewhere."""
    copies, labels = [], []
    for pos, (token, special) in enumerate(zip(input_ids, is_special)):
        if special:
            continue
        copy, label = list(input_ids), [-100] * len(input_ids)
        copy[pos], label[pos] = mask_token_id, token
        copies.append(copy)
        labels.append(label)
    return copies, labels


@torch.no_grad()
def pseudo_perplexity(accelerator, module, examples, collator, *, n: int,
                      batch_size: int) -> float | None:
    """The pseudo-perplexity of the first ``n`` of ``examples`` (an `IndexedExamples`) through
    the prepared ``module`` (`loading.MaskedLMModule`: summed loss and count), copies padded by
    the eval ``collator``'s layout; specials are its tokenizer's special ids or-ed with each
    example's ``special_tokens_mask``. None when no token can be masked. Every process must call
    it."""
    copies, labels = [], []
    for item in examples.fetch(range(min(n, len(examples)))):
        ids = [int(t) for t in item["input_ids"]]
        special = collator.tables.is_special[torch.tensor(ids, dtype=torch.long)].tolist()
        if item.get("special_tokens_mask") is not None:
            special = [a or bool(b) for a, b in zip(special, item["special_tokens_mask"])]
        rows, targets = single_mask_copies(ids, special, collator.tokenizer.mask_token_id)
        copies += rows
        labels += targets
    if not copies:
        return None
    sums = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # -log p sum, count
    starts = range(0, len(copies), batch_size)
    for number in _my_batches(len(starts), accelerator):
        start = starts[0 if number is None else number]
        batch = _padded(collator.layout, copies[start:start + batch_size],
                        labels[start:start + batch_size])
        if number is None:
            drop_targets(batch)
        loss_sum, count = module(**model_inputs(send_to_device(batch, accelerator.device)))
        sums[0] += loss_sum.double()
        sums[1] += count.double()
    sums = accelerator.reduce(sums, "sum")
    return math.exp(sums[0].item() / sums[1].item())


class Probe:
    """One probe set (`probe_file.ProbeSet`) tokenized at ``max_length``: its texts' token ids,
    labels, order by length, and ``name`` in its metrics' names (None: the run's only probe)."""

    def __init__(self, probe_set, tokenizer, max_length: int, name: str | None = None):
        tokens = tokenizer(probe_set.texts, truncation=True, max_length=max_length)["input_ids"]
        self.token_ids, self.labels, self.name = tokens, np.asarray(probe_set.labels), name
        self.by_length = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))


class Downstream:
    """A run's downstream measures (`__call__` at every eval, by `evaluation.Evaluator`; every
    process calls it): the probe sets (a list of `probe_file.ProbeSet`) tokenized once, at
    ``cfg.max_seq_length``, each a `Probe` named by its file's stem when there are several; the
    pseudo-perplexity on the first ``cfg.pseudo_perplexity_examples`` of
    ``examples``. ``seconds``: the last call's time."""

    def __init__(self, accelerator, module, collator, cfg, probe_sets=(), examples=None):
        self.accelerator, self.module, self.collator, self.cfg = accelerator, module, collator, cfg
        self.examples, self.seconds = examples, 0.0
        several = len(probe_sets) > 1
        self.probes = [Probe(p, collator.tokenizer, cfg.max_seq_length,
                             probe_name(p.path) if several else None) for p in probe_sets]

    @property
    def enabled(self) -> bool:
        return bool(self.probes) or bool(self.cfg.pseudo_perplexity_examples)

    def probe(self, mask_padding: bool, probe: Probe | None = None) -> tuple[float, float]:
        """(mean, std) of ``probe``'s accuracy (default: the first) on embeddings with or without
        the mask."""
        accelerator = self.accelerator
        probe = self.probes[0] if probe is None else probe
        features = embed(accelerator, self.module, probe.token_ids, self.collator.layout,
                         batch_size=self.cfg.per_device_eval_batch_size,
                         mask_padding=mask_padding,
                         order=probe.by_length if mask_padding else None)
        result = [None]
        if accelerator.is_main_process:
            result = [probe_accuracy(features.cpu().numpy(), probe.labels, self.cfg.probe_folds)]
        return broadcast_object_list(result, from_process=0)[0]

    def __call__(self) -> dict:
        if not self.enabled:
            return {}
        t0 = time.perf_counter()
        was_training = self.module.training
        self.module.eval()
        metrics = {}
        try:
            for probe in self.probes:
                for mask_padding in ARMS_OF[self.cfg.probe_mask_padding]:
                    mean_key, std_key = (probe_key(key, probe.name)
                                         for key in PROBE_ARMS[mask_padding])
                    metrics[mean_key], metrics[std_key] = self.probe(mask_padding, probe)
            if self.cfg.pseudo_perplexity_examples and self.examples is not None:
                pppl = pseudo_perplexity(self.accelerator, self.module, self.examples,
                                         self.collator, n=self.cfg.pseudo_perplexity_examples,
                                         batch_size=self.cfg.per_device_eval_batch_size)
                if pppl is not None:
                    metrics[EVAL_PSEUDO_PERPLEXITY] = pppl
        finally:
            self.module.train(was_training)
        self.seconds = time.perf_counter() - t0
        return metrics
