"""The real trainer for the benchmarks: `pipeline.train.loop.Trainer` over the DeepSpeed engine, so they
time `Trainer.train_step` itself, fed by a real train loader or by one synthetic batch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


class SyntheticLoader:
    """One batch yielded forever, counting samples as `TrainLoader` does (the trainer's position reads
    `epoch` and `samples_seen`); for timing the step without any data cost."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor]):
        self.batch = batch
        self.epoch, self.samples_seen = 0, 0
        self.num_samples = 2**40

    def __len__(self) -> int:
        return self.num_samples // self.batch[0].shape[0]

    def __iter__(self):
        while True:
            self.samples_seen += self.batch[0].shape[0]
            yield self.batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.samples_seen = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.samples_seen = state["epoch"], state["samples_seen"]


def build_trainer(cfg, model: torch.nn.Module, loader, device: torch.device, ema_decay: float | None = None):
    """A one-process Trainer (distributed already initialised) over `model` and `loader`; its run dir is a
    temporary folder (`trainer.output_dir`)."""
    from pipeline.train.build import plan_for
    from pipeline.train.ema import ShardedEma
    from pipeline.train.engines import backend
    from pipeline.train.loop import StopFlag, Trainer
    from pipeline.train.losses import build_loss

    engine = backend(cfg).build(cfg, model, 1, device)
    ema = ShardedEma(engine.module, ema_decay, engine) if ema_decay is not None else None
    output_dir = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    return Trainer(cfg, plan_for(cfg, 1), engine, build_loss(cfg), ema, loader, None, device, output_dir,
                   0.0, StopFlag(), "bench")
