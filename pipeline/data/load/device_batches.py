"""data.decode=device: the encoded batch a loader worker sends, and its decode + augment on the device.

Workers (wds.py, ffcv.py) only read each entry's stored image, parse its header (size, format: `peek`;
FFCV's metadata holds both) and draw the entry's `TrainParams` (aug_params), the same keyed parameters
as the CPU path: the order, the parameters and exact resume do not depend on the path, and a run may
switch paths between restarts.
The main process (`DeviceDecoder`, called by loader.py) decodes the batch on the training device
(batched nvJPEG on CUDA; PNG / CMYK / grayscale by PIL on the CPU, as the CPU path does), crops and
resizes (train: the drawn box; val: resize + center crop), flips and applies RandAugment
(device_augment); the loader's shared device stage (normalise, RandomErasing, Mixup/CutMix) follows.
An undecodable image is named by the format's `where(index)` (shard and key), or with skip_bad
replaced by the nearest good sample of the batch after augmentation (train) or left out (val), as on
the CPU path (`wds.fill_bad`, `wds.drop_bad`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from pipeline.data.load import wds  # module, not names: wds imports this module too
from pipeline.data.load.aug_params import ParamSource, TrainParams
from pipeline.data.load.augment import open_image
from pipeline.data.load.config import DataConfig
from pipeline.data.load.device_augment import (
    crop_resize,
    decode_batch,
    on_device,
    rand_augment,
    val_resize_crop,
)


@dataclass
class EncodedBatch:
    """What a worker sends for one batch on the device path (labels travel beside it)."""

    datas: list  # per entry: encoded bytes, an HWC uint8 array (FFCV raw image), or None (unreadable)
    jpeg: np.ndarray  # bool: an RGB JPEG, decoded on the device
    ok: np.ndarray  # bool: False where the worker could not read the image (reported there already)
    indices: np.ndarray  # sample indices, for messages
    params: TrainParams | None = None  # None: val


class Header(NamedTuple):
    """What a worker needs of an encoded image on the device path."""

    size: tuple[int, int]  # (width, height), as PIL's Image.size
    jpeg: bool  # an RGB JPEG: decoded on the device


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG's start-of-frame segment, or None when `data` is not a
    JPEG whose frame header comes before its first scan (PIL then reads the header). Walking the marker
    segments is ~10x cheaper than PIL's header parse, the largest worker cost of this path."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _SOF:
            if pos + 10 > end:
                return None
            h, w = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
            return (h, w, data[pos + 9]) if h and w else None
        elif marker == 0xDA or marker == 0xD9:  # a scan or the end before any frame header
            return None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def peek(data: bytes) -> Header:
    """The `Header` of encoded bytes; raises as PIL does for an unreadable image."""
    frame = jpeg_frame(data)
    if frame is not None:
        return Header((frame[1], frame[0]), frame[2] == 3)
    img = open_image(data)
    return Header(img.size, on_device(img))


def encoded(datas: list, heads: list, ok: np.ndarray, indices: np.ndarray, params=None) -> EncodedBatch:
    """EncodedBatch of bytes and their `Header`s (None where unreadable)."""
    jpeg = np.asarray([h is not None and h.jpeg for h in heads], bool)
    return EncodedBatch(datas, jpeg, ok, np.asarray(indices), params)


class DeviceDecoder:
    """Decodes and augments `EncodedBatch`es on `device`; `where(index)` names a sample in messages."""

    def __init__(self, cfg: DataConfig, device: torch.device, where, params: ParamSource | None = None):
        self.cfg, self.device, self.where, self.params = cfg, device, where, params

    def _decode(self, batch: EncodedBatch) -> tuple[list, np.ndarray]:
        """(3, H, W) uint8 images on the device (None where undecodable) and the updated ok mask."""
        ok = batch.ok.copy()
        good = np.flatnonzero(ok).tolist()
        datas, mask = [batch.datas[j] for j in good], batch.jpeg[good].tolist()
        try:
            images = decode_batch(datas, self.device, mask)
        except Exception:  # one bad image fails the batched call: find it
            images = []
            for j, data, m in zip(good, datas, mask, strict=True):
                try:
                    images.append(decode_batch([data], self.device, [m])[0])
                except Exception as e:  # libjpeg / nvJPEG / PIL raise many types for bad data
                    ok[j] = wds.bad_sample(self.where(batch.indices[j]), e, self.cfg.skip_bad)
                    images.append(None)
        out = [None] * len(ok)
        for j, x in zip(good, images, strict=True):
            out[j] = x
        return out, ok

    def train(self, batch: EncodedBatch, labels, maps=None):
        """(uint8 (B, S, S, 3) on the device, labels, number of undecodable images replaced); the batch's
        `LabelTargets` (`maps`) get the same replacements."""
        images, ok = self._decode(batch)
        p, size = batch.params, self.params.size
        modes = self.params.modes(p)
        x = torch.zeros(len(ok), 3, size, size, dtype=torch.uint8, device=self.device)
        good = np.flatnonzero(ok)
        if len(good):
            x[torch.as_tensor(good, device=self.device)] = crop_resize(
                [images[j] for j in good], p.boxes[good], size, [modes[j] for j in good])
        x = torch.where(torch.as_tensor(p.flips, device=self.device).view(-1, 1, 1, 1), x.flip(-1), x)
        if self.params.rand_augment is not None:
            x = rand_augment(x, p.ops, p.args, self.params.op_names, self.params.fill, modes)
        x, labels, skipped = wds.fill_bad(x, torch.as_tensor(labels), ok, maps or ())
        return x.permute(0, 2, 3, 1), labels, skipped

    def val(self, batch: EncodedBatch, labels):
        """(uint8 (B', S, S, 3) on the device, labels, number left out): resize, center crop."""
        images, ok = self._decode(batch)
        size = self.cfg.eval_img_size
        good = [images[j] for j in np.flatnonzero(ok)]
        if good:
            mode = "bicubic" if self.cfg.interpolation == "random" else self.cfg.interpolation
            x = val_resize_crop(good, size, self.cfg.crop_pct, mode)
        else:
            x = torch.zeros(0, 3, size, size, dtype=torch.uint8, device=self.device)
        return x.permute(0, 2, 3, 1), torch.as_tensor(labels)[torch.as_tensor(ok)], int((~ok).sum())
