"""WebDataset and FFCV loaders on real shards: exact resume, rank split, 2 -> 1 ranks, val once, bad input."""

import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from pipeline.data.errors import DataError
from pipeline.data.load.config import DataConfig
from pipeline.data.load.loader import build_train_loader, build_val_loader
from pipeline.data.load.sampler import epoch_order
from tests.conftest import fake_shards

pytest.importorskip("ffcv")
pytestmark = pytest.mark.slow  # builds real shards, compiles FFCV's decoder, many loader passes

FORMATS = ("wds", "ffcv")
CPU = torch.device("cpu")
NUM_TRAIN, NUM_VAL = 48, 12


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fake_shards(tmp_path_factory.mktemp("loader"), train=NUM_TRAIN, val=NUM_VAL, min_side=40,
                       max_side=90, seed=3, shard_bytes=24_000)


def cfg_for(root, fmt, **kw):
    base = dict(root=root, format=fmt, batch_size=4, workers=0, img_size=32, eval_img_size=32,
                shuffle_buffer=12, seed=7)
    return DataConfig(**{**base, **kw})


def run(loader, limit=None):
    out = []
    for x, y in loader:
        out.append((x.clone(), y.clone()))
        if limit is not None and len(out) == limit:
            break
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


_REFERENCE = {}


def reference(root, fmt, world, rank, epoch=1):
    """Uninterrupted epoch with 0 workers (cached: several tests compare against it)."""
    key = (fmt, world, rank, epoch)
    if key not in _REFERENCE:
        loader = build_train_loader(cfg_for(root, fmt), rank, world, CPU)
        loader.set_epoch(epoch)
        _REFERENCE[key] = run(loader)
    return _REFERENCE[key]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_resume_gives_identical_batches(root, fmt, workers, world):
    for rank in range(world):
        ref = reference(root, fmt, world, rank)
        loader = build_train_loader(cfg_for(root, fmt, workers=workers), rank, world, CPU)
        assert len(loader) == NUM_TRAIN // (4 * world) == len(ref)
        loader.set_epoch(1)
        head = run(loader, limit=2)
        state = loader.state_dict()
        assert state["samples_seen"] == 2 * 4 * world and state["epoch"] == 1
        resumed = build_train_loader(cfg_for(root, fmt, workers=workers), rank, world, CPU)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        resumed.set_epoch(1)  # a trainer calling set_epoch with the same epoch keeps the position
        tail = run(resumed)
        assert_same(head + tail, ref)  # also: the worker count changes nothing
        assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["samples_seen"] == 0
        assert resumed.batches_remaining() == len(resumed)
        x, y = ref[0]
        assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and y.shape == (4, 4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_epochs_differ_and_ranks_differ(root, fmt):
    a, b = reference(root, fmt, 2, 0), reference(root, fmt, 2, 1)
    c = reference(root, fmt, 2, 0, epoch=2)
    assert not torch.equal(a[0][0], b[0][0]) and not torch.equal(a[0][0], c[0][0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_ranks_then_one_covers_exactly_the_unseen_samples(root, fmt):
    """Mixup off, so each sample's tensor depends only on (seed, epoch, index, repeat): we can follow it."""
    kw = dict(mixup=0.0, cutmix=0.0)
    first, k = {}, 2
    for rank in range(2):
        loader = build_train_loader(cfg_for(root, fmt, **kw), rank, 2, CPU)
        loader.set_epoch(1)
        plan = loader.plan()
        for b, (x, y) in enumerate(run(loader, limit=k)):
            for j in range(4):
                first[(int(plan.indices[b, j]), int(plan.repeats[b, j]))] = (x[j], int(y[j]))
        state = loader.state_dict()
    one = build_train_loader(cfg_for(root, fmt, **kw), 0, 1, CPU)
    one.load_state_dict(state)
    assert one.batches_remaining() == (NUM_TRAIN - 2 * k * 4) // 4
    plan = one.plan()
    later = {}
    for b, (x, y) in enumerate(run(one)):
        for j in range(4):
            later[(int(plan.indices[b, j]), int(plan.repeats[b, j]))] = (x[j], int(y[j]))
    order = epoch_order(NUM_TRAIN, 7, 1, 3, one.blocks, 12)
    everything = list(zip(order[0].tolist(), order[1].tolist(), strict=True))
    assert len(first) == 2 * k * 4 and not set(first) & set(later)
    assert set(first) | set(later) == set(everything)  # 48 = 6 global batches of 8: no remainder
    # the 1-rank run's samples are exactly what a 2-rank run would have produced for them
    full = build_train_loader(cfg_for(root, fmt, **kw), 1, 2, CPU)
    full.set_epoch(1)
    plan = full.plan()
    for b, (x, y) in enumerate(run(full)):
        for j in range(4):
            entry = (int(plan.indices[b, j]), int(plan.repeats[b, j]))
            got = first.get(entry) or later[entry]
            assert torch.equal(got[0], x[j]) and got[1] == int(y[j])


@pytest.mark.parametrize("fmt", FORMATS)
def test_val_sees_every_image_exactly_once_across_ranks(root, fmt):
    single = [(x, y) for x, y in build_val_loader(cfg_for(root, fmt), 0, 1, CPU)]
    labels = torch.cat([y for _, y in single])
    assert len(labels) == NUM_VAL and sorted(labels.tolist()) == sorted([0, 1, 2, 3] * 3)
    parts, counts = [], []
    for rank in range(5):  # 12 images over 5 ranks: uneven shares, no padding
        loader = build_val_loader(cfg_for(root, fmt), rank, 5, CPU)
        batches = run(loader)
        counts.append(sum(len(y) for _, y in batches))
        assert loader.num_samples == NUM_VAL and loader.rank_samples == counts[-1]
        parts += batches
    assert sum(counts) == NUM_VAL and max(counts) - min(counts) <= 1
    assert torch.equal(torch.cat([x for x, _ in parts]), torch.cat([x for x, _ in single]))
    assert torch.equal(torch.cat([y for _, y in parts]), labels)


def test_both_formats_take_the_same_crop_and_flip(root):
    """The formats differ only in resampling (bicubic vs INTER_AREA) and FFCV's re-encoded JPEG."""
    kw = dict(rand_augment="", color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, shuffle_buffer=10**6)
    a = run(build_train_loader(cfg_for(root, "wds", **kw), 0, 1, CPU))
    b = run(build_train_loader(cfg_for(root, "ffcv", **kw), 0, 1, CPU))
    xa, xb = torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b])
    assert torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in b]))
    same = (xa - xb).abs().mean()
    assert same < 0.2 * (xa - xb.roll(1, 0)).abs().mean()  # another sample's crop
    assert same < 0.2 * (xa - xb.flip(3)).abs().mean()  # the other flip


def _copy(root, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(root, dst)
    return str(dst), json.load(open(os.path.join(root, "manifest.json")))


def test_member_index_matches_tarfile_and_is_cached(root, tmp_path):
    from pipeline.data.load.wds import ShardSet, scan_shard

    manifest = json.load(open(os.path.join(root, "manifest.json")))
    entry = manifest["splits"]["train"]["wds"]["shards"][0]
    path = os.path.join(root, "wds", entry["name"])
    offsets, sizes, labels, *_ = scan_shard(path, entry["name"], entry["num_samples"])
    with tarfile.open(path) as tf:
        images = [m for m in tf.getmembers() if not m.name.endswith(".cls")]
        want = [int(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".cls")]
    assert list(offsets) == [m.offset_data for m in images] and list(sizes) == [m.size for m in images]
    assert list(labels) == want
    dst, manifest = _copy(root, tmp_path)
    ShardSet(dst, "train", manifest["splits"]["train"]["wds"]["shards"])
    cached = [n for n in os.listdir(os.path.join(dst, "wds")) if n.startswith(".index-train-")]
    assert len(cached) >= 1
    with open(path, "rb") as f:
        head = f.read(os.path.getsize(path) // 2)
    with open(os.path.join(dst, "wds", entry["name"]), "wb") as f:  # truncated: the cache must not hide it
        f.write(head)
    with pytest.raises(DataError, match=f"shard {entry['name']} (is corrupt|holds)") as e:
        ShardSet(dst, "train", manifest["splits"]["train"]["wds"]["shards"])
    assert "key ''" not in str(e.value)  # the cut-off member is not reported as a sample


def test_missing_shard_is_named(root, tmp_path):
    dst, manifest = _copy(root, tmp_path)
    name = manifest["splits"]["train"]["wds"]["shards"][1]["name"]
    os.remove(os.path.join(dst, "wds", name))
    with pytest.raises(DataError, match=f"shard {name} is missing"):
        build_train_loader(cfg_for(dst, "wds"), 0, 1, CPU)


def _member(path, suffix):
    with tarfile.open(path) as tf:
        return next(m for m in tf.getmembers() if m.name.endswith(suffix))


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image_is_named_or_skipped(root, tmp_path, workers):
    dst, manifest = _copy(root, tmp_path)
    name = manifest["splits"]["train"]["wds"]["shards"][0]["name"]
    path = os.path.join(dst, "wds", name)
    m = _member(path, ".jpg")
    with open(path, "r+b") as f:
        f.seek(m.offset_data + 2)
        f.write(b"\x00garbage" * (m.size // 8 - 1))
    key = m.name.rsplit(".", 1)[0]
    loader = build_train_loader(cfg_for(dst, "wds", workers=workers, repeated_aug=1), 0, 1, CPU)
    with pytest.raises(DataError, match=f"shard {name}, key '{key}': undecodable image") as err:
        run(loader)
    assert "\n" not in str(err.value)  # one line, also when raised in a worker
    cfg = cfg_for(dst, "wds", workers=workers, repeated_aug=1, skip_bad=True)
    loader = build_train_loader(cfg, 0, 1, CPU)
    batches = run(loader)
    assert len(batches) == len(loader) == NUM_TRAIN // 4
    if workers == 0:
        assert loader.skipped == 1


def test_corrupt_tar_is_named(root, tmp_path):
    dst, manifest = _copy(root, tmp_path)
    name = manifest["splits"]["train"]["wds"]["shards"][0]["name"]
    path = os.path.join(dst, "wds", name)
    m = _member(path, ".cls")
    with open(path, "r+b") as f:  # overwrite the header of the member after the first .cls
        f.seek(m.offset_data + 512)
        f.write(os.urandom(512))
    with pytest.raises(DataError, match=f"shard {name} (holds|is corrupt)"):
        run(build_train_loader(cfg_for(dst, "wds", shuffle_buffer=10**6), 0, 1, CPU))


@pytest.mark.parametrize("split", ["train", "val"])
def test_ffcv_undecodable_image_is_named_or_skipped(root, tmp_path, split):
    from ffcv.reader import Reader

    dst, manifest = _copy(root, tmp_path)
    path = os.path.join(dst, "ffcv", f"{split}.beton")
    meta = Reader(path).metadata["f0"]
    jpg = np.flatnonzero(meta["mode"] == 0)[0]
    with open(path, "r+b") as f:
        f.seek(int(meta["data_ptr"][jpg]))
        f.write(b"\xff\xd8" + b"\x00" * 62)
    build = build_train_loader if split == "train" else build_val_loader
    with pytest.raises(DataError, match=f"FFCV file {split}.beton, sample index {jpg}: undecodable"):
        run(build(cfg_for(dst, "ffcv", repeated_aug=1), 0, 1, CPU))
    loader = build(cfg_for(dst, "ffcv", repeated_aug=1, skip_bad=True), 0, 1, CPU)
    got = sum(len(y) for _, y in run(loader))
    assert loader.skipped == 1 and got == (NUM_TRAIN if split == "train" else NUM_VAL - 1)


def test_mid_epoch_resume_with_another_order_is_refused(root):
    loader = build_train_loader(cfg_for(root, "wds"), 0, 1, CPU)
    run(loader, limit=1)
    state = loader.state_dict()
    with pytest.raises(DataError, match="mid-epoch with data.shuffle_buffer=12"):
        build_train_loader(cfg_for(root, "wds", shuffle_buffer=24), 0, 1, CPU).load_state_dict(state)
    with pytest.raises(DataError, match="mid-epoch with data.format='wds'"):
        build_train_loader(cfg_for(root, "ffcv"), 0, 1, CPU).load_state_dict(state)


def test_wrong_format_and_missing_root_are_clear(root, tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        build_train_loader(cfg_for(str(tmp_path), "wds"), 0, 1, CPU)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_train_loader(cfg_for(root, "wds", batch_size=64), 0, 1, CPU)
