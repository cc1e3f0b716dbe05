"""optim.py: the optimizer's weight-decay groups, and every LR schedule the config accepts
(choices.SCHEDULERS) builds through optim.build_scheduler, steps for a whole run, and has its
shape; warmup_stable_decay's phases are checked at config time and at build time. (train_step
and StepResults: test_step_sync.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model

from mlmkit.config.choices import SCHEDULERS
from mlmkit.config.errors import ConfigError
from mlmkit.config.fields import MLMConfig
from mlmkit.config.parse import parse_config
from mlmkit.config.validation import validate_config
from mlmkit.train.optim import build_optimizer, build_scheduler

STEPS, WARMUP, PEAK = 100, 10, 1e-3


def test_no_weight_decay_on_biases_and_layernorm():
    model = tiny_model("bert", 100)
    opt = build_optimizer(model, parse_config(["--weight_decay", "0.1"]))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert all(names[id(p)].endswith("weight") and "LayerNorm" not in names[id(p)]
               for p in decay["params"])


def lr_curve(name: str, **overrides) -> list[float]:
    """The lr used by each of STEPS optimizer steps (read before the step, as the recipe logs
    after it), with WARMUP warmup steps."""
    cfg = validate_config(MLMConfig(lr_scheduler_type=name, num_warmup_steps=WARMUP,
                                    learning_rate=PEAK, **overrides))
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=PEAK)
    scheduler = build_scheduler(optimizer, cfg, STEPS)
    lrs = []
    for _ in range(STEPS):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_builds_steps_and_warms_up(name):
    lrs = lr_curve(name)
    assert len(lrs) == STEPS and all(math.isfinite(x) and 0 <= x <= PEAK * (1 + 1e-9) for x in lrs)
    if name == "constant":  # the one schedule without warmup
        assert lrs == [PEAK] * STEPS
        return
    assert lrs[0] == 0.0  # linear warmup from 0 ...
    assert lrs[:WARMUP + 1] == sorted(lrs[:WARMUP + 1])  # ... rising ...
    assert lrs[WARMUP] == pytest.approx(PEAK)  # ... to the peak


@pytest.mark.parametrize("name, end", [
    ("linear", 0.0), ("cosine", 0.0), ("cosine_with_restarts", 0.0), ("polynomial", 0.0),
    ("warmup_stable_decay", 0.0), ("constant_with_warmup", PEAK), ("inverse_sqrt", None)])


def test_shape_after_warmup(name, end):
    after = lr_curve(name)[WARMUP:]
    if end == PEAK:  # constant_with_warmup: flat at the peak
        assert after == pytest.approx([PEAK] * len(after))
        return
    # every decaying schedule is non-increasing after warmup
    assert all(b <= a + 1e-15 for a, b in zip(after, after[1:])), name
    if end is None:  # inverse_sqrt: lr = peak * sqrt(warmup / step), never reaching 0
        assert after[-1] == pytest.approx(PEAK * math.sqrt(WARMUP / (STEPS - 1)))
    else:  # the last step's lr is within one step of 0
        assert after[-1] < PEAK * 0.05, (name, after[-5:])


def test_warmup_stable_decay_is_stable_then_decays_over_decay_ratio():
    lrs = lr_curve("warmup_stable_decay", decay_ratio=0.2)  # 20 decay steps: 80..99
    assert lrs[WARMUP:80] == [PEAK] * 70  # stable at the peak
    decay = lrs[80:]
    assert decay[0] == pytest.approx(PEAK) and decay[-1] < PEAK * 0.01  # cosine to ~0
    assert all(b < a for a, b in zip(decay[1:], decay[2:]))


def test_decay_ratio_is_checked_at_config_time_and_build_time():
    with pytest.raises(ConfigError, match="decay_ratio"):
        parse_config(["--decay_ratio", "0"])
    with pytest.raises(ConfigError, match=r"decay_ratio.*warmup_ratio .* exceeds 1"):
        parse_config(["--lr_scheduler_type", "warmup_stable_decay", "--warmup_ratio", "0.5",
                      "--decay_ratio", "0.6"])
    parse_config(["--warmup_ratio", "0.5", "--decay_ratio", "0.6"])  # other schedules: unused
    with pytest.raises(ConfigError, match=r"15 warmup \+ 90 decay steps exceed the 100"):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                        MLMConfig(lr_scheduler_type="warmup_stable_decay", decay_ratio=0.9,
                                  num_warmup_steps=15), STEPS)
