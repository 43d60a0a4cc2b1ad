"""Per-sample train augmentation parameters as data: crop box, flip, RandAugment's ops and arguments.

Both decode paths can draw from here: the CPU (PIL) path applies them with timm's PIL ops
(`apply_pil`), the device path with batched tensor ops (`device_augment`). The draws reproduce
today's `TrainAugment` exactly for the same entry keys: the crop box and flip come from the
STREAM_CROP uniforms (`rrc_box`), RandAugment from the STREAM_PIL key, replaying the draws timm's
`RandAugment.__call__` / `AugmentOp.__call__` make with python `random` and numpy's global RNG
(ops chosen with replacement by `np.random.choice`; per op: the `prob` test, the gauss magnitude
noise clipped to [0, magnitude_max or 10], then timm's own `level_fn`, which draws the sign of the
signed ops). The arguments are timm's level-function outputs, so timm's magnitudes are used as-is.
Color jitter (only without RandAugment, as timm) has no drawn parameters: the CPU path applies it
seeded from the entry's PIL key (`apply_cpu`); the device path refuses it (config.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.errors import DataError
from pipeline.data.load.augment import (
    PIL_INTERP,
    RANDOM_MODES,
    RRC_LOG_RATIO,
    RRC_SCALE,
    TrainAugment,
    rrc_box,
    seeded_pil_rngs,
)
from pipeline.data.load.config import DataConfig

SKIP = -1  # op index of a RandAugment layer whose `prob` test failed (the layer does nothing)
_INT_ARG_OPS = frozenset({"Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize",
                          "SolarizeIncreasing", "SolarizeAdd"})
_LEVEL_DENOM = 10.0  # timm's auto_augment._LEVEL_DENOM: the default magnitude upper bound


@dataclass
class TrainParams:
    """Parameters of a batch of B entries; RandAugment with L layers (L = 0 when it is off)."""

    boxes: np.ndarray  # (B, 4) int64 crop box (top, left, height, width) in full-image pixels
    flips: np.ndarray  # (B,) bool: horizontal flip (applied after the crop, before RandAugment)
    ops: np.ndarray  # (B, L) int64 index into `ParamSource.op_names`, or SKIP
    args: np.ndarray  # (B, L) float64 the op's argument (timm's level_fn output; 0 for no-argument ops)
    keys: np.ndarray  # (B,) uint64 the entries' PIL keys (seed color jitter on the CPU path)
    modes: tuple[str, ...] = ()  # per entry "bilinear" | "bicubic" with data.interpolation=random, else ()


class ParamSource:
    """Draws `TrainParams` for (epoch, indices, repeats) and image sizes; picklable, cheap to call."""

    def __init__(self, cfg: DataConfig):
        self.augment = TrainAugment(cfg)
        self.size = cfg.img_size
        self.hflip = cfg.hflip
        self.random_mode = cfg.interpolation == "random"
        ra = self.augment.rand_augment
        self.rand_augment = ra
        self.fill = self.augment.fill
        self.op_names = tuple(op.name for op in ra.ops) if ra is not None else ()
        self.num_layers = ra.num_layers if ra is not None else 0
        if ra is not None and any(isinstance(op.kwargs["resample"], (list, tuple)) for op in ra.ops):
            raise DataError("a random RandAugment interpolation is not supported: set data.interpolation")

    def _rand_augment(self, key: int, seed) -> tuple[list[int], list[float]]:
        """The (op index or SKIP, argument) of each layer for PIL key `key` (timm's draw order)."""
        ra = self.rand_augment
        seed(key)
        chosen = np.random.choice(len(ra.ops), ra.num_layers, replace=ra.choice_weights is None,
                                  p=ra.choice_weights)
        ops, args = [], []
        for i in chosen.tolist():
            op = ra.ops[i]
            if op.prob < 1.0 and random.random() > op.prob:
                ops.append(SKIP)
                args.append(0.0)
                continue
            magnitude = op.magnitude
            if op.magnitude_std == float("inf"):
                magnitude = random.uniform(0, magnitude)
            elif op.magnitude_std > 0:
                magnitude = random.gauss(magnitude, op.magnitude_std)
            magnitude = max(0.0, min(magnitude, op.magnitude_max or _LEVEL_DENOM))
            level = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else (0.0,)
            ops.append(i)
            args.append(float(level[0]))
        return ops, args

    def draw(self, epoch: int, indices: np.ndarray, repeats: np.ndarray, heights, widths) -> TrainParams:
        """Parameters of entries (indices, repeats) of `epoch` whose images are heights x widths."""
        us = self.augment.crop_boxes(epoch, indices, repeats)
        n = len(us)
        boxes = np.asarray([rrc_box(int(h), int(w), u, *RRC_SCALE, *RRC_LOG_RATIO)
                            for h, w, u in zip(heights, widths, us, strict=True)], np.int64).reshape(n, 4)
        ops = np.full((n, self.num_layers), SKIP, np.int64)
        args = np.zeros((n, self.num_layers), np.float64)
        keys = self.augment.pil_keys(epoch, indices, repeats)
        if self.rand_augment is not None:
            with seeded_pil_rngs() as seed:
                for j, key in enumerate(keys.tolist()):
                    ops[j], args[j] = self._rand_augment(key, seed)
        modes = tuple(RANDOM_MODES[int(u >= 0.5)] for u in us[:, 23]) if self.random_mode else ()
        return TrainParams(boxes, us[:, 22] < self.hflip, ops, args, keys, modes)

    def modes(self, p: TrainParams) -> list[str]:
        """Each entry's interpolation ("bilinear" | "bicubic") of the crop resize and RandAugment's
        geometric ops: its drawn mode with data.interpolation=random, else data.interpolation."""
        return list(p.modes) if p.modes else [self.augment.mode] * len(p.flips)

    def apply_pil(self, img: Image.Image, flip: bool, ops, args, mode: str | None = None) -> Image.Image:
        """Flip + RandAugment of one crop with timm's PIL ops, from drawn parameters (no random draws);
        `mode` overrides the geometric ops' interpolation (data.interpolation=random)."""
        resample = {} if mode is None else {"resample": PIL_INTERP[mode]}
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        for i, arg in zip(ops, args, strict=True):
            if i == SKIP:
                continue
            op = self.rand_augment.ops[i]
            level = () if op.level_fn is None else (int(arg) if op.name in _INT_ARG_OPS else float(arg),)
            img = op.aug_fn(img, *level, **{**op.kwargs, **resample})
        return img

    def apply_cpu(self, img: Image.Image, p: TrainParams, j: int, seed) -> np.ndarray:
        """The CPU path's flip + RandAugment (or seeded color jitter) of entry j's crop, as HWC uint8;
        `seed` from `seeded_pil_rngs`."""
        if self.augment.color_jitter is None:
            mode = p.modes[j] if p.modes else None
            return np.asarray(self.apply_pil(img, p.flips[j], p.ops[j], p.args[j], mode), dtype=np.uint8)
        return self.augment.pil_stage(img, 0.0 if p.flips[j] else 1.0, int(p.keys[j]), seed)
