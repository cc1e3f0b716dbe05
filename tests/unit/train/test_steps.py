"""The per-step schedules as the step source applies them (`steps.StepPreparer`,
`steps.PlannedSteps`): each prepared step at its own mask rate, length and batch, whoever
prepares it (inline or a worker ahead of the loop), the same steps again from any step's
position, and an LR schedule as long as the steps the plan cuts."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from mlmkit.batch.collator import MaskedLMCollator
from mlmkit.config.keys import TRAIN_BATCH_FRACTION, TRAIN_MLM_PROBABILITY, TRAIN_SEQ_LENGTH
from mlmkit.config.parse import parse_config
from mlmkit.config.shape import run_shape
from mlmkit.data.corpus import Example
from mlmkit.model.checks import load_tokenizer
from mlmkit.model.loading import load_model
from mlmkit.train.loop import train_step
from mlmkit.train.optim import build_scheduler, prepare_training
from mlmkit.train.steps import (
    PlannedSteps,
    Prefetcher,
    RunSteps,
    StaticShapes,
    StepPreparer,
    add_masked_positions,
)

SCHEDULES = ("--mlm_probability", "0.3", "--mlm_probability_final", "0.1",
             "--seq_len_warmup_steps", "12", "--seq_len_warmup_start", "32",
             "--batch_warmup_steps", "8")


class Examples:
    """Synthetic tokenized examples of 5 to 120 tokens (the IndexedExamples interface)."""

    def __init__(self, tokenizer, n=80):
        gen = torch.Generator().manual_seed(0)
        self.rows = [[tokenizer.cls_token_id,
                      *torch.randint(2000, 9000, (int(torch.randint(3, 118, (1,), generator=gen)),),
                                     generator=gen).tolist(), tokenizer.sep_token_id]
                     for _ in range(n)]
        self.lengths = [len(r) for r in self.rows]

    def __len__(self):
        return len(self.rows)

    def fetch(self, indices):
        return [Example(input_ids=self.rows[i], special_tokens_mask=[1] + [0] * (len(
            self.rows[i]) - 2) + [1], idx=int(i), source=0) for i in indices]


def build(tiny_bert_dir, tokenizer_path, padding, *flags,
          length=("--max_train_steps", "30")) -> RunSteps:
    """The recipe's steps (`RunSteps.build`) on one CPU process: 4 examples or rows of 128
    tokens per micro-batch, 2 micro-batches a step, ``length`` (30 steps), the schedules unless
    ``flags`` say otherwise."""
    AcceleratorState._reset_state(True)
    cfg = parse_config(["--config_name", tiny_bert_dir, "--tokenizer_name", tokenizer_path,
                        "--padding", padding, "--max_seq_length", "128",
                        "--attn_implementation", "sdpa", "--gradient_accumulation_steps", "2",
                        *length, *SCHEDULES, *(() if "--per_device_train_tokens" in flags else
                                               ("--per_device_train_batch_size", "4")), *flags])
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    training = prepare_training(cfg, accelerator, load_model(cfg, tokenizer,
                                                             device=accelerator.device))
    return RunSteps.build(cfg, accelerator, training, tokenizer, Examples(tokenizer),
                          padding=padding)


def same_steps(want, got):
    assert (want.position, want.real, want.scheduled) == (got.position, got.real, got.scheduled)
    for x, y in zip(want.micro_batches, got.micro_batches, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("padding, flags", [("longest", ()), ("packed", ()),
                                            ("longest", ("--per_device_train_tokens", "512"))],
                         ids=["padded", "packed", "budget"])
def test_each_step_is_prepared_at_its_rate_length_and_batch(tiny_bert_dir, tokenizer_path,
                                                            padding, flags):
    """Step t reports its mask rate (`Ramps.mlm_probability`), length and batch fraction; its
    rows are no longer than its length; its masks are those of the collator at that rate (the
    same draws keyed by (seed, epoch, idx), only the threshold moves); a padded step holds
    max_seq_length / length x the batch fraction x 4 examples per micro-batch."""
    run_steps = build(tiny_bert_dir, tokenizer_path, padding, *flags)
    ramps, source = run_steps.schedule.ramps, run_steps.source()
    assert ramps.total_steps == 30
    steps = list(itertools.islice(source, 30))
    lengths = [s.scheduled[TRAIN_SEQ_LENGTH] for s in steps]
    assert lengths[0] == 32 and lengths[-1] == 128 and sorted(lengths) == lengths
    assert {64} <= set(lengths) <= {32, 64, 128}
    fractions = [s.scheduled[TRAIN_BATCH_FRACTION] for s in steps]
    assert fractions[0] < 0.3 and fractions[-1] == 1.0
    for t, step in enumerate(steps):
        assert step.position.done == t + 1
        assert step.scheduled[TRAIN_MLM_PROBABILITY] == ramps.mlm_probability(t)
        for batch in step.micro_batches:
            assert batch["input_ids"].shape[1] <= lengths[t]
        if padding == "longest" and not flags and t < 4:  # 40 of epoch 0's 80 examples
            assert [int(b["num_examples"]) for b in step.micro_batches] == [
                ramps.units(t, 4)] * 2
    rates = [s.scheduled[TRAIN_MLM_PROBABILITY] for s in steps]
    assert rates[0] == 0.3 and rates[-1] == pytest.approx(0.1) and sorted(rates) == rates[::-1]
    # the masks of step t: the collator's at the rate of step t
    collator, plan = run_steps.collator, run_steps.schedule.plan
    batches, shapes = plan.epoch_steps(0, 0)
    fixed = StepPreparer(collator, max_length=128)  # no schedules: the rate set by hand
    for t in sorted({0, len(batches) // 2, len(batches) - 1}):  # epoch 0's steps
        collator.set_mlm_probability(ramps.mlm_probability(t))
        again = fixed(plan.split(batches[t]), steps[t].position, mask_epoch=0,
                      fetch=source.examples.fetch, shape=shapes[t])
        assert again.scheduled == {}
        for x, y in zip(steps[t].micro_batches, again.micro_batches, strict=True):
            assert torch.equal(x["labels"], y["labels"]) and torch.equal(x["input_ids"],
                                                                         y["input_ids"])


@pytest.mark.parametrize("padding, flags", [("packed", ()),
                                            ("longest", ("--per_device_train_tokens", "512"))],
                         ids=["packed", "budget"])
def test_steps_resume_exactly_mid_warmup_and_mid_schedule(tiny_bert_dir, tokenizer_path,
                                                          padding, flags):
    """From the position of any step (what a checkpoint saves: epoch, step of it, steps done)
    the source prepares the very steps that followed it, in the warm-up, after it and across
    epochs; worker processes that prepare steps ahead hand out the same steps, each at the rate
    and shape of the step it is for."""
    run_steps = build(tiny_bert_dir, tokenizer_path, padding, *flags)
    source = run_steps.source()
    run = list(itertools.islice(source, 30))
    assert len({s.position.epoch for s in run}) >= 2  # crosses an epoch boundary
    for k in (2, 7, 15, 26):  # in both warm-ups, in the length's only, after both
        again = PlannedSteps(source.examples, source.preparer, plan=source.plan,
                             position=run[k].position, num_epochs=source.num_epochs)
        for want, got in zip(run[k + 1:], again):
            same_steps(want, got)
    prefetcher = Prefetcher(run_steps.source(run[4].position), num_workers=2)
    for want in run[5:12]:
        same_steps(want, prefetcher.next()[0])
    prefetcher.close()


def test_the_lr_schedule_spans_the_steps_the_warmup_cuts(tiny_bert_dir, tokenizer_path):
    """Two epochs with a batch warm-up take more steps than two of full batches: the run's
    length (and the LR schedule's, linear to 0) is the count of the steps the plan cuts."""
    run_steps = build(tiny_bert_dir, tokenizer_path, "longest", "--batch_warmup_steps", "15",
                      length=("--num_train_epochs", "2"))
    schedule = run_steps.schedule
    taken = list(run_steps.source())
    assert schedule.max_steps == len(taken) > 2 * len(schedule.plan)
    assert [s.position.epoch for s in taken][-1] == 1 and schedule.num_epochs == 2
    lr = run_steps.scheduler.lr_lambdas[0]
    assert lr(schedule.max_steps) == 0 < lr(schedule.max_steps - 1)
    assert schedule.epoch_at(schedule.max_steps, 1) == 2.0


def test_a_compiled_packed_run_holds_the_schedules_highest_mask_rate():
    """The one shape of a compiled packed run (`StaticShapes`) has room for the masked positions
    at the schedule's higher rate; warm-ups, whose rows change, leave the shape free."""
    def shapes(*flags):
        cfg = parse_config(["--torch_compile", "true", "--padding", "packed", *flags])
        return StaticShapes.for_run(cfg, run_shape(cfg, num_processes=1, on_gpu=True,
                                                   padding="packed"))
    rising = shapes("--mlm_probability", "0.15", "--mlm_probability_final", "0.3")
    assert rising.masked == shapes("--mlm_probability", "0.3").masked > shapes().masked
    assert shapes("--batch_warmup_steps", "5") is None


def test_uneven_micro_batches_give_the_token_mean_of_the_whole_step(tiny_bert_dir,
                                                                   tokenizer_path):
    """What a warm-up's small, uneven micro-batches rely on: a step of micro-batches of 1 and 5
    examples has the loss and the gradient (its norm, before clipping) of one micro-batch of
    all 6 -- the loss is divided by the step's masked tokens, not averaged per micro-batch."""
    AcceleratorState._reset_state(True)
    cfg = parse_config(["--config_name", tiny_bert_dir, "--tokenizer_name", tokenizer_path,
                        "--attn_implementation", "sdpa", "--max_seq_length", "128",
                        "--mlm_probability", "0.3", "--max_grad_norm", "1e9"])
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    training = prepare_training(cfg, accelerator, load_model(cfg, tokenizer,
                                                             device=accelerator.device))
    scheduler = build_scheduler(training.optimizer, cfg, 10)
    collator = MaskedLMCollator.from_config(tokenizer, cfg, position_offset=0, padding="longest")
    examples = Examples(tokenizer).fetch(range(6))
    start = copy.deepcopy((training.module.state_dict(), training.optimizer.state_dict()))
    results = []
    for accumulation, micro in ((2, [examples[:1], examples[1:]]), (1, [examples])):
        training.module.load_state_dict(start[0])
        training.optimizer.load_state_dict(start[1])
        accelerator.gradient_accumulation_steps = accumulation
        out = train_step(accelerator, training.module, training.optimizer, scheduler,
                         [add_masked_positions(collator(m)) for m in micro],
                         mask_padding=True, max_grad_norm=cfg.max_grad_norm)
        results.append([float(out[k]) for k in ("loss_sum", "masked_tokens", "grad_norm")])
    (uneven_loss, uneven_masked, uneven_norm), (loss, masked, norm) = results
    assert uneven_masked == masked > 20
    assert uneven_loss == pytest.approx(loss, rel=1e-5)
    assert uneven_norm == pytest.approx(norm, rel=1e-4)
