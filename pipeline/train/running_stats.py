"""BatchNorm's running statistics under data parallelism without SyncBatchNorm (CPU, `train.sync_bn=false`).

Each rank updates them from its own batches, and DeepSpeed's checkpoint keeps rank 0's only. Evaluations
and saves use their average over the ranks (as timm's `--dist-bn reduce`), so every rank evaluates one
model and the checkpoint holds the model that was evaluated. Each rank's own values are put back after
that, and kept in its rank file for a resume at the same world size: neither an evaluation nor an extra
save (a signal's) changes what training continues from, and a resumed run matches an uninterrupted one
bit for bit. Training never reads them (BatchNorm normalises with the batch's own statistics).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pipeline.train import distributed

SUFFIXES = ("running_mean", "running_var")


class RankLocalStats:
    def __init__(self, module: nn.Module, ema=None):
        """`module`: the trained module; `ema`: its ShardedEma (whose buffer copies are rank-local too)."""
        self.tensors: dict[str, torch.Tensor] = {
            f"model.{n}": b for n, b in module.named_buffers() if n.endswith(SUFFIXES)}
        if ema is not None:
            self.tensors.update(
                {f"ema.{n}": s for n, s in ema.named_shadow_buffers() if n.endswith(SUFFIXES)})
        self._own: dict[str, torch.Tensor] | None = None  # this rank's values while the average is in

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's own values (also while the average is in place)."""
        own = self._own if self._own is not None else self.tensors
        return {name: t.detach().cpu().clone() for name, t in own.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore this rank's own values; names the state lacks (a checkpoint without them) keep what the
        engine loaded (rank 0's)."""
        for name, t in self.tensors.items():
            if name in state:
                t.copy_(state[name])

    @contextmanager
    @torch.no_grad()
    def averaged(self) -> Iterator[None]:
        """The average over the ranks in place for the block; this rank's own values afterwards."""
        self._own = {name: t.detach().clone() for name, t in self.tensors.items()}
        try:
            distributed.average_over_ranks(list(self.tensors.values()))
            yield
        finally:
            for name, t in self.tensors.items():
                t.copy_(self._own[name])
            self._own = None
