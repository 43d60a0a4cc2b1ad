"""fp32 exponential moving average of the weights, correct under sharded parameters without per-step gathers.

Each rank averages what the engine says it holds locally (`engine.local_shard`): the full (fp32,
autocast) parameters, or under ZeRO-3 only its own partition, so an update costs 1/world of the model
and no communication. Buffers (BatchNorm statistics) are never partitioned:
float buffers are averaged, integer ones copied, as timm's ModelEmaV3 does. `full_state_dict()`
gathers the partitions (only when saving or exporting); `swap()` puts the EMA into the live module
for evaluation and restores the trained weights afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from pipeline.models.checkpoints import CheckpointError
from pipeline.train.engines import Engine, Unsharded


class ShardedEma:
    def __init__(self, module: nn.Module, decay: float, engine: Engine | Unsharded | None = None):
        """`engine`: the one training `module` (which says what each rank holds); None for a plain module."""
        self.engine = engine if engine is not None else Unsharded()
        self.module = module
        self.decay = decay
        self._local = self.engine.local_shard
        self.params = [(n, p) for n, p in module.named_parameters()]
        persistent = set(module.state_dict().keys())
        self.buffers = [(n, b) for n, b in module.named_buffers() if n in persistent]
        self.shadow = [self._local(p).detach().float().clone() for _, p in self.params]
        self.shadow_buffers = [b.detach().clone() for _, b in self.buffers]

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.decay
        torch._foreach_lerp_(self.shadow, [self._local(p).float() for _, p in self.params], weight)
        for s, (_, b) in zip(self.shadow_buffers, self.buffers, strict=True):
            if b.is_floating_point():
                s.lerp_(b.to(s.dtype), weight)
            else:
                s.copy_(b)

    def named_shadow_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """The EMA's own copies of the module's buffers, by the module's buffer names."""
        return [(name, s) for s, (name, _) in zip(self.shadow_buffers, self.buffers, strict=True)]

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated fp32 EMA on CPU (a collective under sharded parameters: call on every rank)."""
        out: dict[str, torch.Tensor] = {}
        for s, (name, p) in zip(self.shadow, self.params, strict=True):
            out[name] = self.engine.full_from_shards(s, p).detach().cpu().clone()
        for s, (name, _) in zip(self.shadow_buffers, self.buffers, strict=True):
            out[name] = s.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a consolidated EMA, each rank keeping its own partition (any world size)."""
        names = [n for n, _ in self.params] + [n for n, _ in self.buffers]
        missing = [n for n in names if n not in state]
        if missing:
            raise CheckpointError(f"the checkpoint's EMA lacks {missing[:3]}: it was saved for another model")
        for s, (name, p) in zip(self.shadow, self.params, strict=True):
            s.copy_(self.engine.shard_of_full(state[name].to(s.device, torch.float32), s, p))
        for s, (name, _) in zip(self.shadow_buffers, self.buffers, strict=True):
            s.copy_(state[name])

    @contextmanager
    @torch.no_grad()
    def swap(self):
        """Temporarily run the engine's module with the EMA weights (and buffers)."""
        saved = [self._local(p).detach().clone() for _, p in self.params]
        saved_buffers = [b.detach().clone() for _, b in self.buffers]
        with self.engine.swapping_weights():
            try:
                for s, (_, p) in zip(self.shadow, self.params, strict=True):
                    self._local(p).copy_(s)
                for s, (_, b) in zip(self.shadow_buffers, self.buffers, strict=True):
                    b.copy_(s)
                yield self.module
            finally:
                for t, (_, p) in zip(saved, self.params, strict=True):
                    self._local(p).copy_(t)
                for t, (_, b) in zip(saved_buffers, self.buffers, strict=True):
                    b.copy_(t)


def effective_decay(decay: float, global_batch: int, base_batch: int, scale: bool) -> float:
    """Per-step decay; with `scale`, a step of `global_batch` images decays like global/base steps."""
    return decay ** (global_batch / base_batch) if scale else decay
