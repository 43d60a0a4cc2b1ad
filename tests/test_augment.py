"""Train/val transforms: the exact RandAugment recipe never raises, per-sample seeding, shared crop boxes."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.errors import DataError
from pipeline.data.load.augment import (
    RRC_LOG_RATIO,
    RRC_SCALE,
    DeviceAugment,
    TrainAugment,
    ValAugment,
    crop_uniforms,
    resize,
    rrc_box,
    seeded_pil_rngs,
)
from pipeline.data.load.config import DataConfig
from pipeline.data.load.sampler import STREAM_CROP, sample_keys


def _jpeg(width: int, height: int, seed: int = 0, quality: int = 92) -> bytes:
    rng = np.random.default_rng(seed)
    # smooth content (a gradient plus a few blobs) so that scaled decoding is meaningful
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1)
    for _ in range(5):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(5, max(6, width // 4))
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_recipe_rand_augment_never_raises_over_many_seeds():
    """rand-m9-mstd0.5-inc1 reaches magnitude 10 (posterize to 0 bits, which Pillow 13 rejects)."""
    aug = TrainAugment(DataConfig(img_size=24))
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(8)]
    changed = 0
    with seeded_pil_rngs() as seed:
        for key in range(600):
            img = imgs[key % len(imgs)]
            out = aug.pil_stage(img, 1.0, key * 7919 + 1, seed)
            assert out.shape == (24, 24, 3) and out.dtype == np.uint8
            changed += not np.array_equal(out, np.asarray(img))
    assert changed > 300  # RandAugment did act (some ops leave noise images unchanged)


def test_every_recipe_op_runs_at_the_top_magnitude():
    """Magnitude 10 is where PosterizeIncreasing asks for 0 bits; the random test above may miss it."""
    from timm.data.auto_augment import AugmentOp

    ops = TrainAugment(DataConfig(img_size=24)).rand_augment.ops
    assert "PosterizeIncreasing" in [op.name for op in ops]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    for op in ops:
        hparams = {**op.hparams, "magnitude_std": 0}
        for sign in range(4):  # both signs of the signed ops
            random.seed(sign)
            out = AugmentOp(op.name, prob=1.0, magnitude=10, hparams=hparams)(img)
            assert out.size == (24, 24)


@pytest.mark.parametrize("kw", [{}, {"rand_augment": "", "color_jitter": 0.4}])
def test_pil_stage_depends_only_on_key_and_restores_global_rngs(kw):
    aug = TrainAugment(DataConfig(img_size=32, **kw))
    img = Image.open(io.BytesIO(_jpeg(32, 32))).convert("RGB")
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with seeded_pil_rngs() as seed:
        a = [aug.pil_stage(img, 0.9, k, seed) for k in range(10)]
        again = aug.pil_stage(img, 0.9, 3, seed)
    assert np.array_equal(a[3], again)
    assert len({x.tobytes() for x in a}) >= 5
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


def test_rrc_box_is_torchvision_like_and_numba_gives_the_same_boxes():
    numba = pytest.importorskip("numba")
    rng = np.random.default_rng(1)
    keys = sample_keys(0, 3, rng.integers(0, 10**6, 400), rng.integers(0, 3, 400), STREAM_CROP)
    us = crop_uniforms(keys)
    jit_box = numba.njit(rrc_box)
    fractions = []
    for u, (h, w) in zip(us, rng.integers(20, 900, (400, 2)), strict=True):
        box = rrc_box(int(h), int(w), u, *RRC_SCALE, *RRC_LOG_RATIO)
        assert tuple(jit_box(int(h), int(w), u, *RRC_SCALE, *RRC_LOG_RATIO)) == box
        top, left, bh, bw = box
        assert 0 <= top and 0 <= left and top + bh <= h and left + bw <= w and bh > 0 and bw > 0
        fractions.append(bh * bw / (h * w))
    assert min(fractions) < 0.2 and max(fractions) > 0.9  # the scale range 0.08..1 is covered


def test_draft_decode_matches_full_decode_closely():
    """JPEG draft mode (decode at 1/2..1/8) is used only as far as the crop keeps >= size pixels."""
    aug = TrainAugment(DataConfig(img_size=32))
    data = _jpeg(640, 480)
    u = np.full(23, 0.5)
    u[0] = 1.0  # a large crop: draft reduces by 4 or 8
    drafted = np.asarray(aug.decode_crop(data, u), np.float32)
    top, left, h, w = rrc_box(480, 640, u, *RRC_SCALE, *RRC_LOG_RATIO)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    ref = np.asarray(full.resize((32, 32), Image.BICUBIC, box=(left, top, left + w, top + h)), np.float32)
    assert np.abs(drafted - ref).mean() < 4.0


def test_val_transform_is_timm_resize_then_center_crop():
    """timm's eval transform with PIL; ours resizes with torch's antialiased uint8 kernel."""
    from timm.data import create_transform

    cfg = DataConfig(eval_img_size=64, crop_pct=0.875)
    data = _jpeg(300, 200)
    out = ValAugment(cfg)(data).astype(np.float32)
    tf = create_transform(64, is_training=False, interpolation="bicubic", crop_pct=0.875)
    ref = tf(Image.open(io.BytesIO(data)).convert("RGB")).numpy().transpose(1, 2, 0)
    ref = ref * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])
    assert out.shape == (64, 64, 3)
    assert np.abs(out - ref * 255).mean() < 0.6


def test_resize_matches_pil_bicubic():
    img = Image.open(io.BytesIO(_jpeg(320, 240, seed=2))).convert("RGB")
    cases = [((10, 20, 250, 230), (64, 64)), ((0, 0, 320, 240), (120, 160)), ((5, 5, 45, 35), (64, 64))]
    for box, size in cases:  # downscale, whole image, upscale
        ours = resize(img, box, size, "bicubic").astype(np.int16)
        pil = np.asarray(img.resize(size[::-1], Image.BICUBIC, box=box), np.int16)
        assert ours.shape == pil.shape and np.abs(ours - pil).mean() < 0.1 and np.abs(ours - pil).max() <= 8


def test_device_stage_normalises_erases_per_sample_and_mixes_per_batch():
    cfg = DataConfig(reprob=0.5, mixup=0.8, cutmix=1.0)
    aug = DeviceAugment(cfg, num_classes=5, device=torch.device("cpu"), train=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=g)
    labels = torch.arange(8) % 5
    idx, rep = np.arange(100, 108), np.zeros(8, np.int64)
    x1, t1 = aug(images, labels, 2, idx, rep, batch_key=11)
    x2, t2 = aug(images, labels, 2, idx, rep, batch_key=11)
    assert x1.shape == (8, 3, 16, 16) and t1.shape == (8, 5)
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    assert torch.allclose(t1.sum(1), torch.ones(8))
    x3, _ = aug(images, labels, 2, idx, rep, batch_key=12)
    assert not torch.equal(x1, x3)
    # erasing alone: a sample's erased pixels follow the sample, not its place in the batch
    erase_only = DeviceAugment(DataConfig(reprob=1.0, mixup=0, cutmix=0), 5, torch.device("cpu"), True)
    a, y = erase_only(images, labels, 2, idx, rep)
    perm = torch.randperm(8, generator=g)
    b, _ = erase_only(images[perm], labels[perm], 2, idx[perm.numpy()], rep)
    assert torch.equal(a[perm], b) and torch.equal(y, labels)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    plain = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert (a - plain).abs().amax() > 0.5  # something was erased ...
    assert torch.isclose(a, plain, atol=1e-5).float().mean() > 0.5  # ... but not everything


@pytest.mark.parametrize(("field", "value"), [("format", "tar"), ("batch_size", 0), ("crop_pct", 1.5),
                                              ("remode", "x"), ("rand_augment", "m9")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(DataError, match=f"data.{field}="):
        DataConfig(**{field: value}).validate()
