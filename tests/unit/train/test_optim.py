"""optim.py: the optimizers (AdamW and StableAdamW: their weight-decay groups, StableAdamW's
exact resume from a checkpoint, what each launch refuses), and every LR schedule the config
accepts (choices.SCHEDULERS) builds through optim.build_scheduler, steps for a whole run, and has
its shape; warmup_stable_decay's phases and decay shapes are checked at config time and at build
time. (train_step and StepResults: test_step_sync.py, test_loop.py.)"""

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


# ------------------------------------------------------------------------------ --optimizer
def test_stable_adamw_takes_the_same_groups_and_settings():
    from optimi import StableAdamW
    model = tiny_model("bert", 100)
    flags = ["--weight_decay", "0.1", "--adam_beta2", "0.98", "--adam_epsilon", "1e-6"]
    adamw = build_optimizer(model, parse_config(flags))
    stable = build_optimizer(model, parse_config([*flags, "--optimizer", "stable_adamw"]))
    assert isinstance(stable, StableAdamW) and isinstance(adamw, torch.optim.AdamW)
    for a, s in zip(adamw.param_groups, stable.param_groups, strict=True):
        assert [id(p) for p in a["params"]] == [id(p) for p in s["params"]]
        assert a["weight_decay"] == s["weight_decay"] and a["lr"] == s["lr"]
        assert (s["beta1"], s["beta2"], s["eps"]) == (*a["betas"], a["eps"]) == (0.9, 0.98, 1e-6)
        assert not s["decouple_lr"]  # decay lr x weight_decay, as AdamW's
    assert [g["weight_decay"] for g in stable.param_groups] == [0.1, 0.0]


def train_some(accelerator, steps: int, cfg, load=None, save=None):
    """``steps`` constant-lr steps of a prepared tiny model (its weights from seed 0) on fixed
    random data; with ``load`` the checkpoint loaded first, with ``save`` one saved after."""
    from mlmkit.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 1))
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg))
    done = 0
    if load is not None:
        load_checkpoint(accelerator, load)
        done = 2
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(5, 6, generator=gen) for _ in range(4)]
    for x in data[done:done + steps]:
        accelerator.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
    if save is not None:
        return save_checkpoint(accelerator, cfg, TrainState(step=done + steps))
    return [p.detach().clone() for p in model.parameters()], optimizer


def test_stable_adamw_state_round_trips_through_a_checkpoint(tmp_path):
    """4 steps in one go, or 2, a checkpoint (checkpoint.save_checkpoint: Accelerate's
    save_state) and 2 more in a fresh process state from it: the same weights, bit for bit --
    StableAdamW's moments and its step count (kept in the parameter group, not the per-tensor
    state) are saved and restored."""
    from accelerate import Accelerator
    from helpers import isolated_globals
    cfg = parse_config(["--optimizer", "stable_adamw", "--learning_rate", "1e-2",
                        "--output_dir", str(tmp_path / "run")])
    with isolated_globals(threads=1):
        want, optimizer = train_some(Accelerator(cpu=True), 4, cfg)
        assert optimizer.optimizer.param_groups[0]["step"].item() == 4
    with isolated_globals(threads=1):
        saved = train_some(Accelerator(cpu=True), 2, cfg, save=True)
    with isolated_globals(threads=1):
        got, optimizer = train_some(Accelerator(cpu=True), 2, cfg, load=saved)
        assert optimizer.optimizer.param_groups[0]["step"].item() == 4
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_optimizer_refusals_by_launch():
    """StableAdamW under DeepSpeed ZeRO (one flat partition per process reaches the optimizer:
    its per-tensor clipping would clip partitions), and --skip_nonfinite_steps under DeepSpeed
    (its step runs inside backward) or fp16 (the loss scaler skips), are refused in one line;
    DDP, FSDP2 and one process take both. ``launch`` stands for the Accelerator's two fields."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mlmkit.train.optim import check_optimizer_launch

    def launch(kind, precision="bf16"):
        return SimpleNamespace(distributed_type=kind, mixed_precision=precision)
    stable = parse_config(["--optimizer", "stable_adamw"])
    skip = parse_config(["--skip_nonfinite_steps", "true"])
    with pytest.raises(ConfigError, match=r"optimizer='stable_adamw' under DeepSpeed ZeRO.*Fix: "
                       r"launch with accelerate_configs/fsdp2.yaml"):
        check_optimizer_launch(stable, launch(DistributedType.DEEPSPEED))
    with pytest.raises(ConfigError, match=r"skip_nonfinite_steps=True: DeepSpeed takes"):
        check_optimizer_launch(skip, launch(DistributedType.DEEPSPEED))
    with pytest.raises(ConfigError, match=r"skip_nonfinite_steps=True: fp16's loss scaler"):
        check_optimizer_launch(skip, launch(DistributedType.MULTI_GPU, "fp16"))
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.FSDP):
        check_optimizer_launch(stable, launch(kind))
        check_optimizer_launch(skip, launch(kind))


def test_optimizer_flags_are_checked_at_config_time():
    with pytest.raises(ConfigError, match=r"optimizer='sgd': not a known value"):
        parse_config(["--optimizer", "sgd"])
    with pytest.raises(ConfigError, match=r"skip_nonfinite_steps=True: .*Fix: use --optimizer "
                       r"adamw"):
        parse_config(["--optimizer", "stable_adamw", "--skip_nonfinite_steps", "true"])


# ------------------------------------------------------------------------------ --lr_decay_type
def test_wsd_decay_shapes():
    """The decay phase (20 steps: 80..99) of each --lr_decay_type, from transformers'
    get_wsd_schedule; unset is cosine, as before the flag."""
    def decay(kind):
        return lr_curve("warmup_stable_decay", decay_ratio=0.2, lr_decay_type=kind)[80:]
    progress = [k / 20 for k in range(20)]
    assert decay("1-sqrt") == pytest.approx([PEAK * (1 - math.sqrt(p)) for p in progress])
    assert decay("linear") == pytest.approx([PEAK * (1 - p) for p in progress])
    assert decay(None) == decay("cosine") == pytest.approx(
        [PEAK * 0.5 * (1 + math.cos(math.pi * p)) for p in progress])
    assert lr_curve("warmup_stable_decay", decay_ratio=0.2, lr_decay_type="1-sqrt")[:80] == \
        lr_curve("warmup_stable_decay", decay_ratio=0.2)[:80]  # warmup and stable unchanged


def test_lr_decay_type_is_refused_with_other_schedules():
    with pytest.raises(ConfigError, match=r"lr_decay_type='1-sqrt': shapes the decay of "
                       r"warmup_stable_decay only.*Fix: add --lr_scheduler_type"):
        parse_config(["--lr_decay_type", "1-sqrt", "--lr_scheduler_type", "cosine"])
    with pytest.raises(ConfigError, match=r"lr_decay_type='sqrt': not a known value"):
        parse_config(["--lr_scheduler_type", "warmup_stable_decay", "--lr_decay_type", "sqrt"])
