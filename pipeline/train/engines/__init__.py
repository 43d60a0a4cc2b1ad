"""The engine seam: what the trainer, EMA, checkpoints and export need from a distributed training engine.

An engine wraps the model and optimizer (data parallelism, sharding, mixed precision, gradient
accumulation, clipping) and owns its own checkpoint files. A backend is one module providing a class
that satisfies `Engine` plus the functions the rest of the package calls on it:

    build(cfg, model, world_size, device, load_universal) -> Engine
    init_distributed(rank, world_size, device, timeout_s)   torch.distributed, as the backend wants it
    checkpoint_layout(cfg) -> dict        the meta.json fields its checkpoint files depend on
    resume_source(ckpt_dir, tag, meta, cfg, world_size) -> str   the tag to load (converted if needed)
    consolidated_state_dict(tag_dir) -> dict   fp32 weights of one of its checkpoints
    config(cfg, world_size, device_type) -> dict   its own config (train --print-deepspeed-config)

Nothing outside this package names a backend module: it asks `backend(cfg)` (tests/test_engines.py
enforces both that and that only `deepspeed_zero` imports `deepspeed`). Importing this package imports
no engine library.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.train.config import Config

# name -> backend module, imported on first use (so `model-info` and the data commands never pay for it)
BACKENDS = {"deepspeed": "pipeline.train.engines.deepspeed_zero"}


def backend(cfg: Config | None = None) -> ModuleType:
    """The backend that trains `cfg` and reads its checkpoints (None: before any config is read, e.g. a
    benchmark's process group). DeepSpeed is the only one, so nothing chooses yet; a second backend adds
    a `train.engine` key (default "deepspeed", which older configs and checkpoints then get) read here."""
    return importlib.import_module(BACKENDS["deepspeed"])


class Engine(Protocol):
    module: nn.Module
    optimizer: torch.optim.Optimizer  # the client optimizer whose groups the LR schedule sets

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> bool:
        """Ends a micro-step; True when an optimizer step happened (accumulation boundary, no overflow)."""
    def grad_norm(self) -> float: ...
    def lr(self) -> float: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def local_shard(self, param: nn.Parameter) -> torch.Tensor:
        """The part of `param` this rank holds (all of it unless parameters are sharded); writable."""
    def full_from_shards(self, shard: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """`param`-shaped tensor from every rank's `shard` (a collective when sharded)."""
    def shard_of_full(self, full: torch.Tensor, shard: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """This rank's part of a full `param`-shaped tensor, laid out like `shard`."""
    def swapping_weights(self) -> AbstractContextManager:
        """Context in which `local_shard` tensors may be overwritten and read back by a forward."""
    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None: ...
    def load(self, ckpt_dir: Path, tag: str) -> dict:
        """Restore weights and optimizer state from `ckpt_dir/tag`; returns the saved client state."""


class Unsharded:
    """The parameter layout of a plain module (every rank holds every parameter): the `Engine` methods
    about shards, for engines that do not partition parameters and for a bare module (EMA tests)."""

    def local_shard(self, param: nn.Parameter) -> torch.Tensor:
        return param.data

    def full_from_shards(self, shard: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        return shard

    def shard_of_full(self, full: torch.Tensor, shard: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        return full.view_as(shard)

    def swapping_weights(self) -> AbstractContextManager:
        return nullcontext()
