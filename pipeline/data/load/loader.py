"""The trainer's entry points: `build_train_loader` / `build_val_loader` for WebDataset or FFCV shards.

A loader runs its format's *batch maker* (`pipeline.data.formats`) that turns (epoch plan, batch
numbers) into uint8 NHWC batches + labels. With `workers` > 0 the batches are produced by that many
processes: worker w makes batches w, w+K, w+2K, ... of the rank's plan, and torch's DataLoader hands
them back in task order, so the output order (and, the augmentation being keyed per entry, the
content) does not depend on the number of workers. Workers are forked (FFCV's compiled pipeline is
inherited, not pickled) afresh for each pass over an epoch, which is also how a new epoch's plan
reaches them. The main process moves each batch to the device (pinned, non-blocking on CUDA) and
runs the device stage (normalise, RandomErasing, Mixup/CutMix) there. With `data.decode=device`
(`DataConfig.decode_on`) workers send encoded bytes + drawn parameters instead, which the main
process decodes and augments on the device first (device_batches.py); batches then look the same.
Nothing here imports DeepSpeed or needs torch.distributed: rank and world size are plain arguments.

Token labeling: with `label_maps` (shards written with LABELS) a train batch is (images, targets,
`label_targets.LabelTargets`), the maps and each sample's augmentation geometry on the device.

Position semantics: `samples_seen` counts global entries of the epoch consumed by batches already
yielded (W*B per batch). `set_epoch(e)` with a different epoch restarts at 0; with the current epoch
it keeps the position (so resume-then-set_epoch works). Finishing an epoch's iteration moves to
epoch+1, position 0. `state_dict()` is identical on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data import manifest
from pipeline.data.errors import DataError
from pipeline.data.formats import FORMATS
from pipeline.data.load.aug_params import ParamSource
from pipeline.data.load.augment import DeviceAugment, batch_key
from pipeline.data.load.config import DataConfig
from pipeline.data.load.device_batches import DeviceDecoder
from pipeline.data.load.label_targets import LabelTargets
from pipeline.data.load.sampler import batches_per_epoch, epoch_order, rank_plan, val_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerError:
    """A loader worker's DataError, sent back in place of a batch so the main process raises it as one
    line (no worker traceback)."""

    message: str


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


class _Batches(torch.utils.data.IterableDataset):
    """Worker w of K yields batches w, w+K, ... of `plan` (see module docstring)."""

    def __init__(self, format_batches, plan, num_batches: int):
        self.format_batches, self.plan, self.num_batches = format_batches, plan, num_batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from self.format_batches.batches(self.plan, range(w, self.num_batches, k))
        except DataError as e:
            if info is None:
                raise
            yield WorkerError(str(e))


def _stream(format_batches, plan, num_batches: int, cfg: DataConfig, device: torch.device):
    """(b, images, labels, skipped) for b = 0..num_batches-1, in order."""
    if num_batches == 0:
        return
    dataset = _Batches(format_batches, plan, num_batches)
    workers = min(cfg.workers, num_batches)
    if workers == 0:
        yield from dataset
        return
    pin = cfg.pin_memory and device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=pin, prefetch_factor=cfg.prefetch,
        worker_init_fn=_worker_init, multiprocessing_context="fork")
    for item in loader:
        if isinstance(item, WorkerError):
            raise DataError(item.message)
        yield item


class TrainLoader:
    """Iterable of (images float (B,3,S,S) on device, targets[, LabelTargets]); see the module docstring."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device,
                 label_maps: bool = False):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        device = torch.device(device)
        cfg = dataclasses.replace(cfg, decode=cfg.decode_on(device))
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        contents = manifest.read(cfg.root)
        section = manifest.split_section(contents, cfg.root, "train", cfg.format)
        self.num_classes = len(contents["classes"])
        self.num_samples = int(section["num_samples"])
        if label_maps and "label_maps" not in section:
            raise DataError(f"data.root={cfg.root!r} has no label maps in its train split: rebuild the "
                            f"shards with make shards LABELS=<maps> (maps: python -m pipeline label-maps)")
        self.params = ParamSource(cfg)
        self.device_augment = DeviceAugment(cfg, self.num_classes, self.device, train=True)
        self.blocks, self.format_batches = FORMATS[cfg.format].load_module().train_batches(
            cfg, section[cfg.format], self.params, label_maps)
        self.decoder = None
        if cfg.decode == "device":
            self.decoder = DeviceDecoder(cfg, self.device, self.format_batches.where, self.params)
        if len(self) == 0:
            raise DataError(f"train split has {self.num_samples} samples, fewer than one global batch "
                            f"({world_size} ranks x data.batch_size={cfg.batch_size}); lower data.batch_size")
        self.epoch = 0
        self.samples_seen = 0
        self.skipped = 0  # undecodable images replaced (skip_bad), this process

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.cfg.batch_size, self.world_size)

    def batches_remaining(self) -> int:
        """Batches the next iteration yields: len(self) from an epoch's start, fewer after a resume."""
        return max(0, self.num_samples - self.samples_seen) // (self.cfg.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.samples_seen = int(epoch), 0

    def _order_settings(self) -> dict:
        """What the epoch order depends on besides (seed, epoch): a mid-epoch resume needs it unchanged."""
        return {"format": self.cfg.format, "repeated_aug": self.cfg.repeated_aug,
                "shuffle_buffer": self.cfg.shuffle_buffer if self.cfg.format == "wds" else 0}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_seen": self.samples_seen, "seed": self.cfg.seed,
                "num_samples": self.num_samples, **self._order_settings()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.cfg.seed or int(state["num_samples"]) != self.num_samples:
            raise DataError(f"loader state is for seed {state['seed']} over {state['num_samples']} samples, "
                            f"but data.seed={self.cfg.seed} over {self.num_samples}: resume with the same "
                            f"seed and shards")
        if int(state["samples_seen"]):
            for field, value in self._order_settings().items():
                if state.get(field, value) != value:
                    raise DataError(f"the checkpoint stopped mid-epoch with data.{field}={state[field]!r}; "
                                    f"data.{field}={value!r} orders the epoch differently: resume with "
                                    f"{state[field]!r} (it may change from the next epoch on)")
        self.epoch, self.samples_seen = int(state["epoch"]), int(state["samples_seen"])

    def plan(self):
        order = epoch_order(self.num_samples, self.cfg.seed, self.epoch, self.cfg.repeated_aug,
                            self.blocks, self.cfg.shuffle_buffer)
        return rank_plan(order, self.epoch, self.samples_seen, self.cfg.batch_size, self.rank,
                         self.world_size)

    def __iter__(self):
        plan = self.plan()
        cuda = self.device.type == "cuda"
        batches = _stream(self.format_batches, plan, plan.num_batches, self.cfg, self.device)
        for b, images, labels, skipped, *maps in batches:  # maps: [LabelTargets] with label_maps
            if self.decoder is not None:
                images, labels, skipped = self.decoder.train(images, labels, *maps)
            if skipped:
                self.skipped += skipped
                log.warning("rank %d: %d undecodable images replaced so far", self.rank, self.skipped)
            start = plan.batch_start(b)
            images = torch.as_tensor(images).to(self.device, non_blocking=cuda)
            labels = torch.as_tensor(labels).to(self.device, non_blocking=cuda)
            x, y = self.device_augment(images, labels, plan.epoch, plan.indices[b], plan.repeats[b],
                                       batch_key(self.cfg.seed, plan.epoch, start, self.rank))
            self.samples_seen = start + self.world_size * self.cfg.batch_size
            self.last_samples = (plan.indices[b], plan.repeats[b])  # (index, repeat) pairs of this batch
            yield x, y, *(LabelTargets(*(t.to(self.device, non_blocking=cuda) for t in m)) for m in maps)
        self.epoch, self.samples_seen = plan.epoch + 1, 0


class ValLoader:
    """Iterable of (images float on device, labels int64); rank r gets a contiguous share."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: torch.device):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        device = torch.device(device)
        cfg = dataclasses.replace(cfg, decode=cfg.decode_on(device))
        self.cfg, self.device = cfg, device
        contents = manifest.read(cfg.root)
        section = manifest.split_section(contents, cfg.root, "val", cfg.format)
        self.num_classes = len(contents["classes"])
        self.num_samples = int(section["num_samples"])  # whole split, all ranks
        share = val_range(self.num_samples, rank, world_size)
        self.rank_samples = len(share)
        b = cfg.batch_size
        self.batch_indices = [np.arange(i, min(i + b, share.stop)) for i in range(share.start, share.stop, b)]
        self.device_augment = DeviceAugment(cfg, self.num_classes, self.device, train=False)
        self.format_batches = FORMATS[cfg.format].load_module().val_batches(cfg, section[cfg.format])
        self.decoder = DeviceDecoder(cfg, self.device, self.format_batches.where) if cfg.decode == "device" \
            else None
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.batch_indices)

    def __iter__(self):
        cuda = self.device.type == "cuda"
        batches = _stream(self.format_batches, self.batch_indices, len(self.batch_indices), self.cfg,
                          self.device)
        for _, images, labels, skipped in batches:
            if self.decoder is not None:
                images, labels, skipped = self.decoder.val(images, labels)
            self.skipped += skipped
            images = torch.as_tensor(images).to(self.device, non_blocking=cuda)
            labels = torch.as_tensor(labels).to(self.device, non_blocking=cuda)
            yield self.device_augment(images, labels)


def build_train_loader(cfg: DataConfig, rank: int, world_size: int, device: torch.device,
                       label_maps: bool = False) -> TrainLoader:
    return TrainLoader(cfg.validate(), rank, world_size, device, label_maps)


def build_val_loader(cfg: DataConfig, rank: int, world_size: int, device: torch.device) -> ValLoader:
    return ValLoader(cfg.validate(), rank, world_size, device)
