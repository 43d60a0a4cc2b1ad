"""The LR schedules and the batch plan, as pure functions of the position (no torch, no distributed state).

Two schedule modes, both timm's `CosineLRScheduler` curve (warmup from `warmup_lr`, cosine to `min_lr`, one
cycle, no warmup prefix, no noise):

- `epoch`: the official RMT/DeiT order. timm's scheduler is stepped once per epoch, *after* the epoch
  (`lr_scheduler.step(epoch)` in qhfan/RMT `classfication_release/main.py`, timm 0.9.10), so epoch 0 trains at
  c(0) = warmup_lr, epoch 1 also at c(0), and epoch e >= 1 at c(e - 1). This reproduces every `train_lr` of
  the official logs `RMT_log/rmt_{t,s,m,l}.txt` to 2e-14 relative (tests/test_schedule.py).
- `step`: the per-update cosine this trainer used so far (`engine.build_scheduler`: t_initial = epochs x
  steps_per_epoch updates, warmup = ceil(warmup_epochs x steps_per_epoch) updates, `step_update(n)` after
  the n-th update), i.e. update n (0-based) trains at c(n).

Since the LR depends only on (epoch) or (updates done, steps_per_epoch), a resume at any step or at another
world size lands on the same value; with the global batch fixed by `batch_plan`, steps_per_epoch does not
depend on the world size either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import InputError

SCHEDULES = ("epoch", "step")


def cosine_with_warmup(t: float, *, peak: float, warmup_lr: float, min_lr: float, warmup_t: float,
                       t_initial: float) -> float:
    """timm's `CosineLRScheduler._get_lr(t)` for one parameter group (same arithmetic, same order)."""
    if t < warmup_t:
        return warmup_lr + t * ((peak - warmup_lr) / warmup_t)
    if t >= t_initial:  # past the single cycle (cycle_limit=1): timm holds lr_min
        return min_lr
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / t_initial))


def lr_at_epoch(epoch: int, *, peak: float, warmup_lr: float, min_lr: float, warmup_epochs: float,
                epochs: int) -> float:
    """The LR that epoch `epoch` (0-based) trains at, constant over the epoch, in the official DeiT order."""
    return cosine_with_warmup(max(epoch - 1, 0), peak=peak, warmup_lr=warmup_lr, min_lr=min_lr,
                              warmup_t=warmup_epochs, t_initial=epochs)


def step_horizon(*, steps_per_epoch: int, warmup_epochs: float, epochs: int) -> tuple[int, int]:
    """(warmup updates, total updates) of the per-step mode, as `engine.build_scheduler` derives them."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, math.ceil(warmup_epochs * steps_per_epoch)) if total > 1 else 0
    return warmup, total


def lr_at_step(update: int, *, steps_per_epoch: int, peak: float, warmup_lr: float, min_lr: float,
               warmup_epochs: float, epochs: int) -> float:
    """The LR of optimizer update `update` (0-based: the updates already done) in the per-step mode."""
    warmup, total = step_horizon(steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs, epochs=epochs)
    return cosine_with_warmup(update, peak=peak, warmup_lr=warmup_lr, min_lr=min_lr, warmup_t=warmup,
                              t_initial=total)


def lr_at(mode: str, *, epoch: int, update: int, steps_per_epoch: int, peak: float, warmup_lr: float,
          min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """The LR of the next optimizer update at position (epoch, `update` updates done) under `mode`."""
    kw = dict(peak=peak, warmup_lr=warmup_lr, min_lr=min_lr, warmup_epochs=warmup_epochs, epochs=epochs)
    if mode == "epoch":
        return lr_at_epoch(epoch, **kw)
    if mode == "step":
        return lr_at_step(update, steps_per_epoch=steps_per_epoch, **kw)
    raise InputError(f"schedule mode {mode!r} is unknown: use one of {', '.join(SCHEDULES)}")


def epoch_mean_lr(mode: str, epoch: int, *, steps_per_epoch: int, peak: float, warmup_lr: float,
                  min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """Mean LR over the updates of epoch `epoch` (its one value in `epoch` mode), for `pipeline schedule`."""
    kw = dict(steps_per_epoch=steps_per_epoch, peak=peak, warmup_lr=warmup_lr, min_lr=min_lr,
              warmup_epochs=warmup_epochs, epochs=epochs)
    first = epoch * steps_per_epoch
    lrs = [lr_at(mode, epoch=epoch, update=u, **kw) for u in range(first, first + steps_per_epoch)]
    return math.fsum(lrs) / len(lrs)


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: `micro_batch` images per rank per micro-step, `grad_accum` micro-steps."""

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def batch_plan(global_batch: int, max_batch_per_device: int, world_size: int) -> BatchPlan:
    """`global_batch` split over `world_size` ranks, the largest micro-batch <= `max_batch_per_device`.

    A world size that does not divide the global batch (2048 on 56 ranks after losing one of 8 nodes) is an
    error, not a nearby batch: any other global batch changes the recipe (LR and EMA decay scale with it, the
    steps per epoch change), and unequal per-rank batches are not supported by DeepSpeed. The message names
    the largest world size below that does divide it.
    """
    checks = (("train.global_batch", global_batch), ("train.max_batch_per_device", max_batch_per_device),
              ("world size", world_size))
    for key, value in checks:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{key} must be a positive integer, got {value!r}")
    if global_batch % world_size:
        fits = max(w for w in range(1, world_size + 1) if global_batch % w == 0)
        raise InputError(f"train.global_batch={global_batch} is not divisible by the world size "
                         f"{world_size}: run on a world size that divides it (the largest <= {world_size} "
                         f"is {fits}), or set train.global_batch to a multiple of {world_size} "
                         f"(a different recipe)")
    per_rank = global_batch // world_size
    micro = next(m for m in range(min(per_rank, max_batch_per_device), 0, -1) if per_rank % m == 0)
    return BatchPlan(micro_batch=micro, grad_accum=per_rank // micro, world_size=world_size)
