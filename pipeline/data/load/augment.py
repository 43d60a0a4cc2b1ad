"""Train/val transforms of the official recipe, seeded per sample, split into CPU and device stages.

Stages (both formats apply the same operations with the same parameters):
- crop: RandomResizedCrop box (scale 0.08-1, ratio 3/4-4/3, torchvision's algorithm) from the
  entry's key (`rrc_box`, shared as-is with FFCV's numba decoder, so a sample gets the same box in
  both formats). WebDataset decodes with PIL, using JPEG draft mode (DCT scaling by 1/2, 1/4, 1/8)
  only as far as the crop still has >= img_size pixels per side, then one antialiased bicubic resize
  of the box (torch's uint8 kernel, which implements PIL's filter; see `resize`).
- PIL stage (CPU, per sample): horizontal flip, then timm's `rand_augment_transform` with the
  hparams timm's `create_transform` uses (translate 0.45*size, mean fill, bicubic). timm uses python
  `random` and numpy's global RNG; `seeded_pil_rngs` saves them (and torch's CPU generator) once
  per batch, seeds them from each entry's key, and restores them. Color jitter is applied only when
  RandAugment is off, as in timm's `create_transform`.
- device stage (`DeviceAugment`, per batch on the training device): uint8 -> float, normalise,
  timm `RandomErasing` (per sample, python `random` and the device's torch generator seeded from the
  entry key), timm `Mixup`/CutMix with label smoothing (numpy RNG seeded from the batch position).
  Images stay uint8 until the device, which moves 4x fewer bytes than float.
With data.decode=device the crop and PIL stages run on the device instead, from the same draws
(aug_params.py, device_augment.py). Random draws therefore depend only on (seed, epoch, sample index,
repeat number), never on worker count or timing. Device-stage draws depend on the device type (CPU
and CUDA torch generators differ).
"""

from __future__ import annotations

import io
import math
import random
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from pipeline.data.load.config import DataConfig
from pipeline.data.load.sampler import STREAM_CROP, STREAM_ERASE, STREAM_MIX, STREAM_PIL, sample_keys, uniform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_SCALE = (0.08, 1.0)
RRC_LOG_RATIO = (math.log(3.0 / 4.0), math.log(4.0 / 3.0))
N_CROP_UNIFORMS = 24  # 10 attempts x (area, ratio), top, left, flip, interpolation (when random)
RANDOM_MODES = ("bilinear", "bicubic")  # timm's _RANDOM_INTERPOLATION, in its order
PIL_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def crop_uniforms(keys: np.ndarray) -> np.ndarray:
    """(n, N_CROP_UNIFORMS) floats in [0, 1) for uint64 crop keys."""
    k = np.arange(N_CROP_UNIFORMS, dtype=np.uint64)[None, :]
    return uniform(np.asarray(keys, dtype=np.uint64)[:, None], k)


def rrc_box(height, width, u, scale_lo, scale_hi, log_r_lo, log_r_hi):
    """(top, left, h, w) of a RandomResizedCrop box; torchvision's algorithm driven by uniforms `u`.

    Plain arithmetic only, so numba compiles the same function for FFCV's decoder.
    """
    area = height * width
    for attempt in range(10):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * u[2 * attempt])
        aspect = math.exp(log_r_lo + (log_r_hi - log_r_lo) * u[2 * attempt + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[20] * (height - h + 1))
            left = int(u[21] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < math.exp(log_r_lo):
        w = width
        h = int(round(w / math.exp(log_r_lo)))
    elif in_ratio > math.exp(log_r_hi):
        h = height
        w = int(round(h * math.exp(log_r_hi)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@contextmanager
def seeded_pil_rngs():
    """Save python `random`, numpy's global RNG and torch's CPU generator, yield a per-entry seeding
    function, restore them."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()

    def seed(key: int) -> None:
        random.seed(key)
        np.random.seed(key & 0xFFFFFFFF)

    try:
        yield seed
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def open_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.size  # noqa: B018 - header parsed here, so truncated/unknown formats fail early
    return img


def resize(img: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], mode: str) -> np.ndarray:
    """Antialiased `mode` resize of `box` (left, top, right, bottom) of an RGB image to `size` (h, w),
    as a contiguous HWC uint8 array. torch's uint8 kernels implement PIL's filters (mean difference
    < 0.02 levels) 3-4x faster than Pillow without SIMD; this resize is the largest per-image cost
    after the JPEG decode."""
    if box != (0, 0, *img.size):
        img = img.crop(box)
    with warnings.catch_warnings():  # read-only buffer: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).unsqueeze(0)
    out = torch.nn.functional.interpolate(x, size=size, mode=mode, antialias=True)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def _rgb(img: Image.Image) -> Image.Image:
    """Decoded RGB image (no extra copy when the file is RGB already)."""
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


class TrainAugment:
    """CPU part of the train transform; picklable (built once, used in loader workers)."""

    def __init__(self, cfg: DataConfig):
        from timm.data.auto_augment import rand_augment_transform

        self.cfg = cfg
        self.size = cfg.img_size
        self.mode = "bicubic" if cfg.interpolation == "random" else cfg.interpolation  # random: per sample
        self.interp = PIL_INTERP[self.mode]
        self.rand_augment = None
        self.color_jitter = None
        self.fill = tuple(min(255, round(255 * x)) for x in IMAGENET_MEAN)  # RandAugment's affine fill
        if cfg.rand_augment:
            hparams = dict(translate_const=int(cfg.img_size * 0.45), img_mean=self.fill,
                           interpolation=self.interp)
            self.rand_augment = rand_augment_transform(cfg.rand_augment, hparams)
        elif cfg.color_jitter > 0:
            from torchvision.transforms import ColorJitter

            self.color_jitter = ColorJitter(*(float(cfg.color_jitter),) * 3)

    def crop_boxes(self, epoch: int, indices: np.ndarray, repeats: np.ndarray) -> np.ndarray:
        return crop_uniforms(sample_keys(self.cfg.seed, epoch, indices, repeats, STREAM_CROP))

    def pil_keys(self, epoch: int, indices: np.ndarray, repeats: np.ndarray) -> np.ndarray:
        return sample_keys(self.cfg.seed, epoch, indices, repeats, STREAM_PIL)

    def decode_crop(self, data: bytes, u: np.ndarray) -> Image.Image:
        """Decode `data` (only at the resolution the crop needs) and return the resized crop."""
        img = open_image(data)
        width, height = img.size
        return self.decode_box(img, rrc_box(height, width, u, *RRC_SCALE, *RRC_LOG_RATIO))

    def decode_box(self, img: Image.Image, box, mode: str | None = None) -> Image.Image:
        """Decode opened `img` (only at the resolution the crop needs), resize box (top, left, h, w) with
        `mode` (default: data.interpolation)."""
        width, height = img.size
        top, left, h, w = (int(v) for v in box)
        if img.format == "JPEG":
            reduce = min(w, h) / self.size
            if reduce >= 2:
                img.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
        sx, sy = img.size[0] / width, img.size[1] / height
        box = (round(left * sx), round(top * sy), round((left + w) * sx), round((top + h) * sy))
        return Image.fromarray(resize(_rgb(img), box, (self.size, self.size), mode or self.mode))

    def pil_stage(self, img: Image.Image, flip_u: float, key: int, seed) -> np.ndarray:
        """Flip + RandAugment (or color jitter) of one crop; `seed` from `seeded_pil_rngs`."""
        if flip_u < self.cfg.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            seed(key)
            img = self.rand_augment(img)
        elif self.color_jitter is not None:
            seed(key)
            torch.default_generator.manual_seed(key & 0x7FFFFFFFFFFFFFFF)  # CPU only: workers are forked
            img = self.color_jitter(img)
        return np.asarray(img, dtype=np.uint8)


class ValAugment:
    """Val transform: resize shorter side to floor(eval_img_size / crop_pct), center crop (timm's eval)."""

    def __init__(self, cfg: DataConfig):
        self.size = cfg.eval_img_size
        self.scale_size = math.floor(cfg.eval_img_size / cfg.crop_pct)
        self.mode = "bicubic" if cfg.interpolation == "random" else cfg.interpolation

    def __call__(self, data: bytes) -> np.ndarray:
        img = open_image(data)
        width, height = img.size
        if img.format == "JPEG":
            reduce = min(width, height) / self.scale_size
            if reduce >= 2:
                img.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
        img = _rgb(img)
        width, height = img.size
        if width <= height:
            new_w, new_h = self.scale_size, int(self.scale_size * height / width)
        else:
            new_w, new_h = int(self.scale_size * width / height), self.scale_size
        resized = resize(img, (0, 0, width, height), (new_h, new_w), self.mode)
        left = int(round((new_w - self.size) / 2.0))
        top = int(round((new_h - self.size) / 2.0))
        return resized[top : top + self.size, left : left + self.size]


class DeviceAugment:
    """Batch step on the device: normalise, RandomErasing, Mixup/CutMix + label smoothing."""

    def __init__(self, cfg: DataConfig, num_classes: int, device: torch.device, train: bool):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.cfg = cfg
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.erase = None
        self.mixup = None
        if train and cfg.reprob > 0:
            self.erase = RandomErasing(cfg.reprob, mode=cfg.remode, max_count=1, device=str(device))
        if train and (cfg.mixup > 0 or cfg.cutmix > 0):
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=1.0,
                               switch_prob=cfg.mixup_switch_prob, mode="batch",
                               label_smoothing=cfg.smoothing, num_classes=num_classes)

    def _generator(self) -> torch.Generator:
        if self.device.type == "cuda":
            return torch.cuda.default_generators[self.device.index or torch.cuda.current_device()]
        return torch.default_generator

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int = 0,
                 indices: np.ndarray | None = None, repeats: np.ndarray | None = None,
                 batch_key: int = 0):
        """`images` uint8 (B,H,W,3) on the device -> float (B,3,H,W); labels -> int64 or soft targets."""
        x = images.permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std).contiguous()
        if self.erase is not None:
            keys = sample_keys(self.cfg.seed, epoch, indices, repeats, STREAM_ERASE)
            gen = self._generator()
            gen_state = gen.get_state()
            with seeded_pil_rngs() as seed:
                for i, key in enumerate(keys.tolist()):
                    seed(key)
                    gen.manual_seed(key & 0x7FFFFFFFFFFFFFFF)
                    self.erase(x[i])
            gen.set_state(gen_state)
        if self.mixup is not None:
            with seeded_pil_rngs() as seed:
                seed(int(batch_key))
                x, labels = self.mixup(x, labels)
        return x, labels


def batch_key(seed: int, epoch: int, position: int, rank: int) -> int:
    """Key of the Mixup draw of `rank`'s batch that starts after `position` global entries."""
    return int(sample_keys(seed, epoch, [position], [rank], STREAM_MIX)[0])
