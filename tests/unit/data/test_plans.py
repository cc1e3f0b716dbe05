import math

import numpy as np
import pytest

from mlmkit.config.shape import Ramps
from mlmkit.data.plans import TrainPlan, eval_plan, micro_layout


def plans(n, batch, accum, world, **kw):
    lengths = np.random.default_rng(0).integers(3, 128, size=n)
    return [TrainPlan(lengths, per_device_batch_size=batch, grad_accum=accum, num_processes=world,
                      process_index=r, seed=5, **kw) for r in range(world)]


@pytest.mark.parametrize("n, batch, accum, world, gbl", [
    (103, 4, 1, 1, False), (103, 4, 2, 2, False), (100, 5, 3, 2, True), (7, 4, 2, 2, False),
    (1000, 8, 1, 4, True)])
def test_each_example_exactly_once_per_epoch(n, batch, accum, world, gbl):
    ps = plans(n, batch, accum, world, group_by_length=gbl)
    for epoch in range(2):
        seen, steps = [], None
        per_rank = [list(p.epoch(epoch)) for p in ps]
        steps = {len(r) for r in per_rank}
        assert steps == {len(ps[0])}  # every process runs the same number of steps...
        for rank_steps in per_rank:
            for _, micro in rank_steps:
                assert len(micro) == accum  # ...and of micro-batches per step
                for mb in micro:
                    assert len(mb) <= batch
                    seen += mb
        assert sorted(seen) == list(range(n))


def test_global_batch_is_independent_of_how_it_is_split():
    """B on 1 process == B/2 on 2 processes == B/2 x 2 accumulation: the same examples per step."""
    one = plans(64, 8, 1, 1)[0]
    two = plans(64, 4, 1, 2)
    acc = plans(64, 4, 2, 1)[0]
    for (s1, m1), (s2a, m2a), (s2b, m2b), (s3, m3) in zip(one.epoch(0), two[0].epoch(0),
                                                           two[1].epoch(0), acc.epoch(0)):
        assert sorted(m1[0]) == sorted(m2a[0] + m2b[0]) == sorted(m3[0] + m3[1])


def test_order_is_reproducible_and_changes_with_epoch_and_seed():
    a, b = plans(50, 4, 1, 1)[0], plans(50, 4, 1, 1)[0]
    assert [m for _, m in a.epoch(0)] == [m for _, m in b.epoch(0)]
    assert [m for _, m in a.epoch(0)] != [m for _, m in a.epoch(1)]
    other = TrainPlan(a.lengths, per_device_batch_size=4, grad_accum=1, num_processes=1,
                      process_index=0, seed=6)
    assert [m for _, m in a.epoch(0)] != [m for _, m in other.epoch(0)]


def test_resume_skips_to_the_same_batches():
    p = plans(50, 4, 1, 1)[0]
    full = list(p.epoch(3))
    assert list(p.epoch(3, start_step=5)) == full[5:]


def test_group_by_length_reduces_padding():
    lengths = np.random.default_rng(1).integers(3, 128, size=4000)
    def pad_fraction(gbl):
        p = TrainPlan(lengths, per_device_batch_size=16, grad_accum=1, num_processes=1,
                      process_index=0, seed=0, group_by_length=gbl)
        real = comp = 0
        for _, (mb,) in p.epoch(0):
            real += lengths[mb].sum()
            comp += lengths[mb].max() * len(mb)
        return 1 - real / comp
    assert pad_fraction(True) < 0.1 < 0.3 < pad_fraction(False)


@pytest.mark.parametrize("n, bs, world", [(10, 4, 1), (10, 4, 3), (2, 4, 3), (64, 32, 2)])
def test_eval_plan_shards_without_duplicates(n, bs, world):
    shards = [eval_plan(n, bs, world, r) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of batches everywhere
    flat = sorted(i for s in shards for b in s for i in b)
    assert flat == list(range(n))


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 2)])
def test_packed_plan_fills_rows_and_covers_every_example_once(world, accum):
    # skewed like real paragraph lengths (median ~32, long tail cut at 128)
    lengths = np.clip(np.random.default_rng(3).lognormal(3.5, 0.7, size=700), 3, 128).astype(int)
    ps = [TrainPlan(lengths, per_device_batch_size=4, grad_accum=accum, num_processes=world,
                    process_index=r, seed=1, pack_capacity=128) for r in range(world)]
    seen, used, rows_total = [], 0, 0
    for p in ps:
        steps = list(p.epoch(0))
        assert len(steps) == len(p)
        for _, micro in steps:
            assert len(micro) == accum
            for mb in micro:
                assert len(mb) <= 4  # rows per micro-batch
                for row in mb:
                    assert lengths[row].sum() <= 128
                    seen += row
                    used += lengths[row].sum()
                rows_total += len(mb)
    assert sorted(seen) == list(range(700))
    assert 1 - used / (rows_total * 128) < 0.03  # rows nearly full
    indices, rows = micro_layout(ps[0].split(ps[0].global_batches(0)[0])[0])
    assert [indices[i] for row in rows for i in row] == indices


def _width(lengths, mb, multiple):
    return -(-int(min(lengths[mb].max(), 128)) // multiple) * multiple


@pytest.mark.parametrize("world, accum, gbl, multiple", [
    (1, 1, False, 1), (2, 2, False, 8), (3, 1, True, 8), (1, 2, True, 1)])
def test_token_budget_fills_padded_micro_batches_and_covers_every_example_once(world, accum, gbl,
                                                                               multiple):
    """--per_device_train_tokens with padded rows: each micro-batch holds as many examples as
    fit with rows x padded width <= the budget; every example once per epoch; every process the
    same number of steps of ``accum`` micro-batches (a short last step: dummies)."""
    lengths = np.clip(np.random.default_rng(3).lognormal(3.5, 0.7, size=900), 3, 200).astype(int)
    budget = 1024
    ps = [TrainPlan(lengths, per_device_batch_size=budget // 128, grad_accum=accum,
                    num_processes=world, process_index=r, seed=1, group_by_length=gbl,
                    token_budget=budget, max_length=128, pad_to_multiple_of=multiple)
          for r in range(world)]
    for epoch in range(2):
        per_rank = [list(p.epoch(epoch)) for p in ps]
        assert {len(r) for r in per_rank} == {len(ps[0].global_batches(epoch))}
        seen, sizes, filled = [], [], []
        for rank_steps in per_rank:
            for _, micro in rank_steps:
                assert len(micro) == accum
                for mb in (m for m in micro if m):
                    computed = len(mb) * _width(lengths, mb, multiple)
                    assert computed <= budget
                    seen += mb
                    sizes.append(len(mb))
                    filled.append(computed / budget)
        assert sorted(seen) == list(range(900))
        assert max(sizes) > budget // 128  # more than the count that fits at full width
        assert np.median(filled) > (0.8 if gbl else 0.6)  # as many as fit: little budget left
    full = list(ps[0].epoch(1))  # resume: the same steps from any step on
    assert list(ps[0].epoch(1, start_step=3)) == full[3:]


def test_token_budget_greedy_rule_is_exact():
    """In plan order, an example joins the micro-batch unless rows x the new width would exceed
    the budget (worked out by hand below)."""
    lengths = np.array([60, 60, 100, 100, 100, 10])
    plan = TrainPlan(lengths, per_device_batch_size=2, grad_accum=1, num_processes=1,
                     process_index=0, seed=0, token_budget=256, max_length=128)
    order = np.arange(6)
    steps = plan._budget_batches(order, np.random.default_rng(0))
    # 60,60 (+100 -> 3 x 100 = 300 > 256) | 100,100 (+100 -> 300) | 100,10 (2 x 100 = 200)
    assert steps == [[[0, 1]], [[2, 3]], [[4, 5]]]


# ------------------------------------------------------------------------------ warm-ups
def test_ramps_give_each_step_its_rate_length_and_batch():
    """Pure functions of the step: the length grows in multiples of 64 (at least the start), a
    shorter step holds proportionally more rows, the batch takes (t + 1) / N of a full step,
    and the mask rate moves linearly from the first step to the last."""
    r = Ramps(128, length_start=32, length_steps=10, batch_steps=8, mlm_start=0.3,
              mlm_final=0.15, total_steps=21)
    assert [r.seq_length(t) for t in range(12)] == [32] * 4 + [64] * 6 + [128] * 2
    # 4 rows of 128 at full shape: 16 of 32 (x 1/8, 2/8, ...), 8 of 64, then 4
    assert [r.units(t, 4) for t in range(12)] == [2, 4, 6, 8, 5, 6, 7, 8, 8, 8, 4, 4]
    assert [r.shape(t, 4).fraction for t in (0, 3, 4, 7, 11)] == [0.125, 0.5, 0.625, 1.0, 1.0]
    assert [r.budget(t, 512) for t in (0, 1, 7, 8, 100)] == [64, 128, 512, 512, 512]
    assert r.mlm_probability(0) == 0.3 and r.mlm_probability(20) == 0.15
    assert r.mlm_probability(10) == pytest.approx(0.225) and r.mlm_probability(99) == 0.15
    assert (r.warmup_end, r.shaped) == (10, True)
    assert Ramps(128).mlm_probability(5) == 0.15 and not Ramps(128, mlm_final=0.2).shaped


WARMUP = Ramps(128, length_start=32, length_steps=10, batch_steps=8)


@pytest.mark.parametrize("kw", [{}, {"group_by_length": True}, {"pack_capacity": 128},
                                {"token_budget": 512, "max_length": 128}],
                         ids=["counts", "grouped", "packed", "budget"])
def test_warmup_steps_follow_the_ramps_and_cover_every_example_once(kw):
    """Every process gets the same number of steps and grad_accum micro-batches each; a step
    holds its units per micro-batch (packed: the window's), rows of at most the step's length,
    a budget's micro-batches fit the step's budget at the step's length; every example once."""
    lengths = np.random.default_rng(0).integers(3, 128, size=300)
    ps = [TrainPlan(lengths, per_device_batch_size=4, grad_accum=2, num_processes=2,
                    process_index=r, seed=5, ramps=WARMUP, **kw) for r in range(2)]
    steps, shapes = ps[0].epoch_steps(0, first=0)
    assert len(shapes) == len(steps) and [s.length for s in shapes[:4]] == [32] * 4
    seen = []
    for t, (step, shape) in enumerate(zip(steps, shapes)):
        micros = [p.split(step) for p in ps]
        assert {len(m) for m in micros} == {2}
        flat = [mb for m in micros for mb in m]
        if "pack_capacity" in kw:
            rows = [row for mb in flat for row in mb]
            assert all(sum(min(lengths[i], shape.length) for i in row) <= shape.length
                       for row in rows)
            seen += [i for row in rows for i in row]
            # a window takes its first step's length; each step its own batch at that length
            assert shape.length <= WARMUP.seq_length(t)
            assert shape == WARMUP.shape(t, 4, length=shape.length)
            if t < len(steps) - 1:
                assert len(rows) == WARMUP.units(t, 4, shape.length) * 4
        elif "token_budget" in kw:
            budget = WARMUP.budget(t, 512)
            for mb in flat:
                assert len(mb) <= 1 or len(mb) * max(min(lengths[i], shape.length)
                                                     for i in mb) <= budget
            seen += [i for mb in flat for i in mb]
        else:
            if t < len(steps) - 1:
                assert len(step) == WARMUP.units(t, 4) * 4
            seen += [i for mb in flat for i in mb]
        if "token_budget" in kw:
            assert shape == WARMUP.shape(t, 512, tokens=True)
        elif "pack_capacity" not in kw:
            assert shape == WARMUP.shape(t, 4)
    assert sorted(seen) == list(range(300))


@pytest.mark.parametrize("kw", [{}, {"pack_capacity": 128}, {"token_budget": 512,
                                                             "max_length": 128}])
def test_epochs_after_the_warmup_are_cut_as_without_it(kw):
    lengths = np.random.default_rng(0).integers(3, 128, size=300)
    ramped, plain = (TrainPlan(lengths, per_device_batch_size=4, grad_accum=2, num_processes=1,
                               process_index=0, seed=5, ramps=r, **kw) for r in (WARMUP, None))
    assert ramped.epoch_steps(1, first=10)[1] is None
    assert list(ramped.epoch(1, first=10)) == list(plain.epoch(1))
    assert list(ramped.epoch(0, first=9)) != list(plain.epoch(0))
    assert list(ramped.epoch(0, start_step=3)) == list(ramped.epoch(0))[3:]


def test_the_run_length_counts_the_warmups_real_steps():
    """Epochs that begin in the warm-up count their real steps (more, shorter ones); the rest
    the plan's; the epoch metric follows them."""
    lengths = np.random.default_rng(0).integers(3, 128, size=300)
    plan = TrainPlan(lengths, per_device_batch_size=4, grad_accum=1, num_processes=1,
                     process_index=0, seed=5, ramps=Ramps(128, batch_steps=40))
    real = [len(plan.epoch_steps(0, 0)[0])]
    real.append(len(plan.epoch_steps(1, real[0])[0]))  # begins at step 41 > 40: full steps
    assert real[0] > len(plan) == real[1] == 75
    assert plan.steps_for_epochs(2) == sum(real)
    assert plan.steps_for_epochs(2.5) == sum(real) + math.ceil(0.5 * 75)
    assert plan.epochs_for_steps(real[0]) == 1 and plan.epochs_for_steps(real[0] + 1) == 2
    assert plan.epochs_done(real[0]) == 1.0 and plan.epochs_done(real[0] + 15) == 1.2
