"""Data-loading settings (`DataConfig`), validated with clear `DataError`s.

The trainer embeds `DataConfig` as the `data` section of its config, so field names are stable and
every field has a default (the official RMT/DeiT recipe for ImageNet-1K).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.errors import DataError
from pipeline.data.formats import FORMATS

INTERPOLATIONS = ("bicubic", "bilinear", "random")
ERASE_MODES = ("pixel", "rand", "const")
DECODES = ("auto", "cpu", "device")


@dataclass
class DataConfig:
    root: str = "shards/imagenet1k"  # OUT of `make shards` (holds manifest.json)
    format: str = "wds"  # a name in pipeline.data.formats.FORMATS: "wds" | "ffcv"
    batch_size: int = 128  # per rank
    workers: int = 8  # loader processes per rank (0: load in the calling process)
    seed: int = 0
    img_size: int = 224  # train crop
    eval_img_size: int = 224
    crop_pct: float = 0.875  # val: resize to eval_img_size / crop_pct, then center crop
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # "" disables RandAugment
    # timm's create_transform ignores color jitter when RandAugment is on (the official recipe's
    # case); we do the same, so it only applies with rand_augment="".
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    hflip: float = 0.5
    # random: per train sample bilinear or bicubic (timm's / TokenLabeling's "random"), for the crop resize
    # and RandAugment's geometric ops, drawn from the sample's key; validation then resizes bicubic
    interpolation: str = "bicubic"
    repeated_aug: int = 3  # each sample appears this many times per epoch with different crops; 1 = off
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    # wds: the epoch order permutes shards, then shuffles samples within windows of consecutive
    # shards holding at least this many samples; >= the split size means one global shuffle.
    shuffle_buffer: int = 50_000
    # where images are decoded and augmented: "cpu" (loader workers, PIL), "device" (workers only read
    # the bytes and draw the parameters; the training device decodes and augments the batch), "auto":
    # device on CUDA, cpu otherwise (and cpu when color jitter, which has no device version, is on)
    decode: str = "auto"
    skip_bad: bool = False  # undecodable images: skip (replaced in the batch, counted) instead of raising
    pin_memory: bool = True  # only used when the device is CUDA
    prefetch: int = 2  # batches prepared ahead per worker
    trace: bool = False  # trainer: write each step's sample keys to output_dir/trace/rank_XXXXX.jsonl

    def validate(self) -> DataConfig:
        def bad(field: str, why: str) -> DataError:
            return DataError(f"data.{field}={getattr(self, field)!r}: {why}")

        if self.format not in FORMATS:
            raise bad("format", f"must be one of {', '.join(FORMATS)}")
        positive = ("batch_size", "img_size", "eval_img_size", "repeated_aug", "shuffle_buffer", "prefetch")
        for field in positive:
            if int(getattr(self, field)) < 1:
                raise bad(field, "must be >= 1")
        if self.workers < 0:
            raise bad("workers", "must be >= 0")
        if not 0.0 < self.crop_pct <= 1.0:
            raise bad("crop_pct", "must be in (0, 1]")
        for field in ("reprob", "hflip", "mixup_switch_prob", "smoothing"):
            if not 0.0 <= float(getattr(self, field)) <= 1.0:
                raise bad(field, "must be in [0, 1]")
        for field in ("mixup", "cutmix", "color_jitter"):
            if float(getattr(self, field)) < 0.0:
                raise bad(field, "must be >= 0")
        if self.interpolation not in INTERPOLATIONS:
            raise bad("interpolation", f"must be one of {', '.join(INTERPOLATIONS)}")
        if self.remode not in ERASE_MODES:
            raise bad("remode", f"must be one of {', '.join(ERASE_MODES)}")
        if self.rand_augment and not self.rand_augment.startswith("rand-"):
            raise bad("rand_augment", "must be a timm RandAugment spec like 'rand-m9-mstd0.5-inc1' or ''")
        if self.decode not in DECODES:
            raise bad("decode", f"must be one of {', '.join(DECODES)}")
        if self.decode == "device" and self.color_jitter_on:
            raise bad("decode", "color jitter (data.color_jitter > 0 without data.rand_augment) runs on the "
                                "CPU only: set data.decode=cpu or data.color_jitter=0")
        return self

    @property
    def color_jitter_on(self) -> bool:
        """timm applies color jitter only when RandAugment is off."""
        return not self.rand_augment and self.color_jitter > 0

    def decode_on(self, device) -> str:
        """The decode path ("cpu" or "device") for training/evaluating on `device`."""
        if self.decode != "auto":
            return self.decode
        return "device" if str(device).startswith("cuda") and not self.color_jitter_on else "cpu"
