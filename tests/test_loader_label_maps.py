"""Train loaders over shards with label maps: each batch carries the LabelTargets of its own samples, the
same in both formats and on both decode paths; shards without maps are refused when maps are asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.data import label_maps
from pipeline.data.errors import DataError
from pipeline.data.load.config import DataConfig
from pipeline.data.load.loader import TrainLoader
from pipeline.data.load.wds import ShardSet

CLASSES = 4


def write_maps(root, keys) -> None:
    """A [2, 5, 3, 4] map per key whose scores encode the key's position in sorted order."""
    for n, key in enumerate(sorted(keys)):
        g = torch.Generator().manual_seed(n)
        scores = torch.full((5, 3, 4), float(n)) + torch.rand(5, 3, 4, generator=g)
        path = label_maps.map_path(root, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.stack([scores, torch.randint(0, CLASSES, (5, 3, 4), generator=g)]).half(), path)


def label_map_shards(base, train_per_class: int, val_per_class: int):
    """`make shards LABELS=...` (both formats) of a 4-class fake ImageNet (40-64 px, no quirks) with a
    random map per train image under `base`. Returns (shards folder, maps folder)."""
    from pipeline.data.convert import fake
    from pipeline.data.convert.shards import write_shards

    fk = fake.write(base / "src", layouts=("folders",), num_classes=CLASSES, train_per_class=train_per_class,
                    val_per_class=val_per_class, min_side=40, max_side=64, large_fraction=0.0, quirks=False,
                    seed=0)
    write_maps(base / "maps", fk.samples["train"])
    write_shards(str(base / "src" / "folders"), base / "out", formats=("wds", "ffcv"), workers=1,
                 shard_bytes=40_000, classes=CLASSES, progress=False, log=lambda *a, **k: None,
                 labels=str(base / "maps"))
    return base / "out", base / "maps"


@pytest.fixture(scope="module")
def tl_shards(tmp_path_factory):
    """(shards with label maps in both formats, the maps folder); 4 classes x 8 train images."""
    return label_map_shards(tmp_path_factory.mktemp("tl_shards"), train_per_class=8, val_per_class=2)


def batches(root, fmt: str, decode: str, label_maps: bool = True):
    """[(batch, sample indices)] of one epoch (RandAugment on: its geometric ops move the maps too)."""
    cfg = DataConfig(root=str(root), format=fmt, batch_size=8, workers=0, img_size=32, repeated_aug=1,
                     mixup=0.0, cutmix=0.0, color_jitter=0.0, decode=decode).validate()
    loader = TrainLoader(cfg, 0, 1, torch.device("cpu"), label_maps=label_maps)
    loader.set_epoch(1)
    return [(batch, loader.last_samples[0].copy()) for batch in loader]


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_each_batch_carries_the_maps_of_its_own_samples_in_both_formats(tl_shards, decode):
    root, maps = tl_shards
    manifest = json.loads((root / "manifest.json").read_text())
    keys = ShardSet(str(root), "train", manifest["splits"]["train"]["wds"]["shards"])
    got = {fmt: batches(root, fmt, decode) for fmt in ("wds", "ffcv")}
    assert len(got["wds"]) == 4
    for (wb, wi), (fb, fi) in zip(got["wds"], got["ffcv"], strict=True):
        assert len(wb) == len(fb) == 3
        np.testing.assert_array_equal(wi, fi)  # the same samples (index i = i-th wds sample)
        for j, index in enumerate(wi.tolist()):
            scores, indices = label_maps.read_pt(maps, keys.key(index), CLASSES)
            assert torch.equal(wb[2].scores[j], torch.from_numpy(scores))
            assert torch.equal(wb[2].indices[j], torch.from_numpy(indices.astype(np.int64)))
        for a, b in zip(wb[2], fb[2], strict=True):  # images below FFCV's 512 px: the same sizes, boxes, ops
            assert torch.equal(a, b)
    moved = [t.theta[:, 0] for (_, _, t), _ in got["wds"]]
    assert any(not torch.equal(m[j], torch.eye(3, dtype=m.dtype)) for m in moved for j in range(len(m)))


def test_the_cpu_and_device_paths_carry_the_same_targets(tl_shards):
    root, _ = tl_shards
    for (c, _), (d, _) in zip(batches(root, "wds", "cpu"), batches(root, "wds", "device"), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(c[2], d[2], strict=True))


def test_without_label_maps_batches_stay_pairs_and_shards_without_maps_are_refused(tl_shards, tiny_shards):
    root, _ = tl_shards
    assert all(len(b) == 2 for b, _ in batches(root, "ffcv", "cpu", label_maps=False)[:1])
    with pytest.raises(DataError, match="has no label maps in its train split: rebuild the shards with "
                                        "make shards LABELS="):
        batches(tiny_shards, "wds", "cpu")
