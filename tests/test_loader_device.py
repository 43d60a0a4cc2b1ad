"""data.decode=device through the loaders on real shards (CPU as the device): same order and
distribution as the CPU path, exact resume, switching paths mid-epoch, val once, bad input."""

import os
import shutil

import numpy as np
import pytest
import torch

from pipeline.data.errors import DataError
from pipeline.data.load.config import DataConfig
from pipeline.data.load.loader import build_train_loader, build_val_loader
from tests.conftest import fake_shards

pytest.importorskip("ffcv")
pytestmark = pytest.mark.slow  # builds real shards, compiles FFCV's decoder for the CPU path

FORMATS = ("wds", "ffcv")
CPU = torch.device("cpu")
NUM_TRAIN, NUM_VAL = 96, 24
LEVELS = 255 * 0.226  # one normalised unit in 8-bit levels (ImageNet std, about)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """4 classes, 80-260 px sides, with the fake dataset's CMYK, grayscale and PNG quirks."""
    return fake_shards(tmp_path_factory.mktemp("loader_device"), train=NUM_TRAIN, val=NUM_VAL,
                       min_side=80, max_side=260, seed=5, shard_bytes=200_000)


def cfg_for(root, fmt, decode, **kw):
    base = dict(root=root, format=fmt, batch_size=16, workers=0, img_size=64, eval_img_size=64, seed=1,
                decode=decode)
    return DataConfig(**{**base, **kw})


def epochs(loader, n, limit=None):
    """(images, targets, (indices, repeats)) of every batch of n epochs (or the first `limit`)."""
    out = []
    for _ in range(n):
        for x, y in loader:
            out.append((x.clone(), y.clone(), tuple(a.copy() for a in loader.last_samples)))
            if limit is not None and len(out) == limit:
                return out
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_train_order_and_distribution_match_the_cpu_path(root, fmt):
    """The full recipe over 3 epochs (288 entries): the same entries and targets (Mixup/CutMix, label
    smoothing) in every batch, and per-channel means within 0.03 and standard deviations within 2% of
    the CPU path's (normalised units; 0.03 is 1.7 levels). Per sample the paths differ by the CPU
    path's JPEG draft decoding (wds) or FFCV's INTER_AREA resize (ffcv) and the affine ops' bicubic
    kernel. Measured: wds 0.0011 / 0.05%, ffcv 0.011 / 0.24%."""
    got = {dec: epochs(build_train_loader(cfg_for(root, fmt, dec), 0, 1, CPU), 3)
           for dec in ("cpu", "device")}
    assert len(got["cpu"]) == len(got["device"]) == 3 * NUM_TRAIN // 16
    for (_, ya, sa), (_, yb, sb) in zip(got["cpu"], got["device"], strict=True):
        assert torch.equal(ya, yb) and all(np.array_equal(a, b) for a, b in zip(sa, sb, strict=True))
    x = {dec: torch.cat([b[0] for b in batches]).double() for dec, batches in got.items()}
    assert x["device"].shape == x["cpu"].shape == (3 * NUM_TRAIN, 3, 64, 64)
    mean = {dec: v.mean((0, 2, 3)) for dec, v in x.items()}
    std = {dec: v.std((0, 2, 3)) for dec, v in x.items()}
    assert (mean["device"] - mean["cpu"]).abs().max() < 0.03, mean
    assert (std["device"] / std["cpu"] - 1).abs().max() < 0.02, std


@pytest.mark.parametrize("fmt", FORMATS)
def test_device_path_resumes_exactly_and_switches_paths_at_the_same_sample(root, fmt):
    """workers 0 == 2; stopped after 2 batches and resumed (same path, or the other path): the same
    entries follow, bit-identical on the same path."""
    ref = epochs(build_train_loader(cfg_for(root, fmt, "device"), 0, 2, CPU), 1)
    with_workers = epochs(build_train_loader(cfg_for(root, fmt, "device", workers=2), 0, 2, CPU), 1)
    for a, b in zip(ref, with_workers, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for first, then in (("device", "device"), ("cpu", "device"), ("device", "cpu")):
        loader = build_train_loader(cfg_for(root, fmt, first), 0, 2, CPU)
        head = epochs(loader, 1, limit=2)
        resumed = build_train_loader(cfg_for(root, fmt, then), 0, 2, CPU)
        resumed.load_state_dict(loader.state_dict())
        tail = head + epochs(resumed, 1)
        assert len(tail) == len(ref)
        for a, b in zip(ref, tail, strict=True):
            assert all(np.array_equal(u, v) for u, v in zip(a[2], b[2], strict=True)), (first, then)
            assert torch.equal(a[1], b[1])
            if first == then:
                assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_val_on_the_device_path_sees_every_image_once(root, fmt):
    """2 ranks: every image once, in the CPU path's order (each device image is nearest to the CPU path's
    image at its position); mean difference < 2 levels (wds: draft decoding) / < 6 (ffcv: INTER_AREA)."""
    images = {}
    for dec in ("cpu", "device"):
        parts = [list(build_val_loader(cfg_for(root, fmt, dec), r, 2, CPU)) for r in (0, 1)]
        images[dec] = torch.cat([x for part in parts for x, _ in part]).double()
        labels = torch.cat([y for part in parts for _, y in part])
        assert len(labels) == NUM_VAL and torch.equal(torch.bincount(labels), torch.full((4,), NUM_VAL // 4))
    diff = (images["device"][:, None] - images["cpu"][None]).abs().mean((2, 3, 4)) * LEVELS
    assert torch.equal(diff.argmin(1), torch.arange(NUM_VAL))
    assert diff.diagonal().mean() < (2.0 if fmt == "wds" else 6.0), diff.diagonal()


def _copy(root, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(root, dst)
    return str(dst)


def _break_first_rgb_jpeg(shards: str, split: str, kind: str) -> tuple[str, str, bytes]:
    """Overwrite (same size) the first RGB JPEG of the split's first wds shard: `header` garbage after the
    SOI marker (the worker's header read fails), or a body broken after the frame and scan headers:
    `truncated` (zeros from there on, a file cut short) or `corrupt` (random entropy-coded data, then
    EOI). Returns (shard name, key, the broken bytes)."""
    import tarfile

    from pipeline.data.load.device_batches import peek

    wds_dir = os.path.join(shards, "wds")
    name = sorted(n for n in os.listdir(wds_dir) if n.startswith(split) and n.endswith(".tar"))[0]
    path = os.path.join(wds_dir, name)
    with tarfile.open(path) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith((".jpg", ".jpeg"))
                 and peek(tf.extractfile(m).read()).jpeg)
        data = tf.extractfile(m).read()
    keep = 2 if kind == "header" else data.index(b"\xff\xda") + 20
    rest = len(data) - keep
    body = {"header": (b"\x00garbage" * rest)[:rest], "truncated": bytes(rest),
            "corrupt": np.random.default_rng(0).integers(0, 256, rest - 2, np.uint8).tobytes() + b"\xff\xd9"}
    broken = data[:keep] + body[kind]
    with open(path, "r+b") as f:
        f.seek(m.offset_data)
        f.write(broken)
    return name, m.name.rsplit("/", 1)[-1].split(".", 1)[0], broken


@pytest.mark.parametrize("kind", ["header", "truncated", "corrupt"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_wds_undecodable_image_is_named_or_replaced(root, tmp_path, split, kind):
    """A broken RGB JPEG in a shard fails on both paths with the same message naming shard and key; with
    skip_bad it is replaced by the nearest good sample of the batch (train) or left out (val) and counted,
    the same labels on both paths. `header`: the device path's worker cannot read the header; `truncated`,
    `corrupt`: the worker reads a valid header and the decode in the training process fails (torchvision's
    libjpeg; whether nvJPEG on CUDA raises too is unchecked until a GPU is lent), as PIL's does on the
    CPU path."""
    from pipeline.data.load.device_batches import peek

    dst = _copy(root, tmp_path)
    name, key, broken = _break_first_rgb_jpeg(dst, split, kind)
    if kind != "header":
        assert peek(broken).jpeg  # the worker takes it for a good RGB JPEG
    build = build_train_loader if split == "train" else build_val_loader
    for dec in ("cpu", "device"):
        with pytest.raises(DataError, match=f"shard {name}, key '{key}': undecodable image"):
            list(build(cfg_for(dst, "wds", dec, repeated_aug=1, workers=1), 0, 1, CPU))
    out = {}
    for dec in ("cpu", "device"):
        loader = build(cfg_for(dst, "wds", dec, repeated_aug=1, skip_bad=True, mixup=0.0, cutmix=0.0,
                               smoothing=0.0), 0, 1, CPU)
        out[dec] = torch.cat([y for _, y in loader])
        assert loader.skipped == 1
    assert len(out["cpu"]) == (NUM_TRAIN if split == "train" else NUM_VAL - 1)
    assert torch.equal(out["cpu"], out["device"])  # the same replacement: the same labels


@pytest.mark.parametrize("split", ["train", "val"])
def test_ffcv_undecodable_image_is_named_or_skipped(root, tmp_path, split):
    """A broken JPEG in the .beton fails the device's decode (in the main process): named by file and
    sample index, or with skip_bad replaced (train) / left out (val) and counted."""
    from ffcv.reader import Reader

    dst = _copy(root, tmp_path)
    path = os.path.join(dst, "ffcv", f"{split}.beton")
    meta = Reader(path).metadata["f0"]
    jpg = np.flatnonzero(meta["mode"] == 0)[0]
    with open(path, "r+b") as f:
        f.seek(int(meta["data_ptr"][jpg]))
        f.write(b"\xff\xd8" + b"\x00" * 62)
    build = build_train_loader if split == "train" else build_val_loader
    with pytest.raises(DataError, match=f"FFCV file {split}.beton, sample index {jpg}: undecodable"):
        list(build(cfg_for(dst, "ffcv", "device", repeated_aug=1), 0, 1, CPU))
    loader = build(cfg_for(dst, "ffcv", "device", repeated_aug=1, skip_bad=True), 0, 1, CPU)
    got = sum(len(y) for _, y in loader)
    assert loader.skipped == 1 and got == (NUM_TRAIN if split == "train" else NUM_VAL - 1)
