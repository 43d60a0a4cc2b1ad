"""LR schedules against the official logs and timm's scheduler; the batch plan at several world sizes."""

import json
import math
from pathlib import Path

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from pipeline.errors import InputError
from pipeline.train.schedule import batch_plan, epoch_mean_lr, lr_at, lr_at_epoch, lr_at_step

OFFICIAL = json.loads((Path(__file__).parent / "data" / "official_lr.json").read_text())["models"]
# the official main.py defaults (qhfan/RMT classfication_release/main.py): lr 5e-4 per 512 images
RECIPE = dict(warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=5, epochs=300)


@pytest.mark.parametrize("name", ["rmt_t", "rmt_l"])
@pytest.mark.parametrize("world", [64, 32, 8])
def test_official_train_lr_per_epoch(name, world):
    plan = batch_plan(2048, 128, world)
    peak = 5e-4 * plan.global_batch / 512
    log = OFFICIAL[name]
    assert len(log["epoch"]) >= 299
    for epoch, logged in zip(log["epoch"], log["train_lr"], strict=True):
        ours = lr_at_epoch(epoch, peak=peak, **RECIPE)
        assert math.isclose(ours, logged, rel_tol=1e-9, abs_tol=0.0), (name, epoch, ours, logged)


def test_epoch_mode_lag_and_ends():
    kw = dict(peak=2e-3, **RECIPE)
    assert lr_at_epoch(0, **kw) == lr_at_epoch(1, **kw) == 1e-6
    assert lr_at_epoch(6, **kw) == pytest.approx(2e-3 * (1 + math.cos(math.pi * 5 / 300)) / 2, rel=1e-2)
    assert lr_at_epoch(301, **kw) == 1e-5  # past the cycle timm holds min_lr
    assert epoch_mean_lr("epoch", 7, steps_per_epoch=3, **kw) == lr_at_epoch(7, **kw)


@pytest.mark.parametrize("steps_per_epoch,warmup_epochs", [(7, 5), (4, 0.5), (3, 0), (1, 2)])
def test_step_mode_equals_timm_scheduler(steps_per_epoch, warmup_epochs):
    """Same values as engine.build_scheduler's CosineLRScheduler driven the way loop.py drives it."""
    epochs, peak = 6, 2e-3
    total = epochs * steps_per_epoch
    warmup = min(total - 1, math.ceil(warmup_epochs * steps_per_epoch))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = CosineLRScheduler(opt, t_initial=total, lr_min=1e-5, warmup_t=warmup, warmup_lr_init=1e-6,
                              t_in_epochs=False)
    kw = dict(steps_per_epoch=steps_per_epoch, peak=peak, warmup_lr=1e-6, min_lr=1e-5,
              warmup_epochs=warmup_epochs, epochs=epochs)
    for update in range(total + 2):
        if update:
            sched.step_update(update)
        assert lr_at_step(update, **kw) == opt.param_groups[0]["lr"], update
        assert lr_at("step", epoch=update // steps_per_epoch, update=update, **kw) == lr_at_step(update, **kw)


def test_unknown_mode_is_one_line_error():
    with pytest.raises(InputError, match="schedule mode 'cosine' is unknown: use one of epoch, step"):
        lr_at("cosine", epoch=0, update=0, steps_per_epoch=1, peak=1e-3, **RECIPE)


@pytest.mark.parametrize("world,micro,accum", [(64, 32, 1), (32, 64, 1), (8, 128, 2), (1, 128, 16)])
def test_batch_plan_keeps_global_batch(world, micro, accum):
    plan = batch_plan(2048, 128, world)
    assert (plan.micro_batch, plan.grad_accum, plan.world_size) == (micro, accum, world)
    assert plan.global_batch == 2048


def test_batch_plan_largest_divisor_not_above_limit():
    plan = batch_plan(1536, 100, 4)  # 384 per rank: 96 x 4, not 100 (which does not divide 384)
    assert (plan.micro_batch, plan.grad_accum) == (96, 4)


@pytest.mark.parametrize("world,fits", [(3, 2), (56, 32)])
def test_batch_plan_world_size_not_dividing_is_an_error(world, fits):
    """2048 on 56 ranks (one of 8 nodes lost) is refused: no other global batch is the same recipe."""
    with pytest.raises(InputError) as e:
        batch_plan(2048, 128, world)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"train.global_batch=2048 is not divisible by the world size {world}" in msg
    assert f"the largest <= {world} is {fits}" in msg


@pytest.mark.parametrize("args", [(0, 128, 8), (2048, 0, 8), (2048, 128, 0), (2048.0, 128, 8)])
def test_batch_plan_bad_numbers(args):
    with pytest.raises(InputError, match="must be a positive integer"):
        batch_plan(*args)
