"""Epoch order and rank split (pure functions): windows, repeats, partition, no DeepSpeed import."""

import subprocess
import sys

import numpy as np
import pytest

from pipeline.data.load.sampler import epoch_order, rank_plan, val_range


def test_epoch_order_is_a_pure_function_with_local_windows():
    blocks = [(0, 5), (5, 7), (12, 4), (16, 6)]
    a = epoch_order(22, seed=1, epoch=2, blocks=blocks, window=10)
    assert np.array_equal(a[0], epoch_order(22, seed=1, epoch=2, blocks=blocks, window=10)[0])
    assert not np.array_equal(a[0], epoch_order(22, seed=1, epoch=3, blocks=blocks, window=10)[0])
    assert sorted(a[0]) == list(range(22)) and not a[1].any()
    # windows: the first window holds whole shards, >= 10 samples
    shard_of = np.searchsorted([0, 5, 12, 16], a[0], side="right")
    first = set(shard_of[:10])
    assert sum(c for i, (_, c) in enumerate(blocks, 1) if i in first) >= 10
    idx, rep = epoch_order(22, seed=1, epoch=2, repeats=3)
    assert len(idx) == 22 and np.array_equal(idx[:3], [idx[0]] * 3) and list(rep[:4]) == [0, 1, 2, 0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_plans_partition_the_epoch_with_equal_batch_counts(world):
    order = epoch_order(50, seed=0, epoch=0, repeats=3)
    plans = [rank_plan(order, 0, 8, 4, r, world) for r in range(world)]
    n = (50 - 8) // (4 * world)
    assert all(p.num_batches == n for p in plans)
    seen = sorted(zip(np.concatenate([p.indices.ravel() for p in plans]),
                      np.concatenate([p.repeats.ravel() for p in plans]), strict=True))
    want = sorted(zip(order[0][8:8 + n * 4 * world], order[1][8:8 + n * 4 * world], strict=True))
    assert seen == want


def test_val_ranges_cover_every_sample_once():
    for world in (1, 2, 3, 5, 13):
        got = [i for r in range(world) for i in val_range(12, r, world)]
        assert got == list(range(12))


@pytest.mark.slow  # a fresh interpreter imports torch, timm and ffcv
def test_data_code_does_not_import_deepspeed():
    code = "import sys, pipeline.data.load.loader, pipeline.data.load.ffcv; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
