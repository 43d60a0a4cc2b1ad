"""Epoch order, per-sample keys, rank split, repeated augmentation and the resume position.

Why one global order: an epoch is a single sequence of entries (sample index, repeat number) that is
a pure function of (seed, epoch, split layout). The loader position is the number of entries
consumed globally (`samples_seen`), identical on every rank. Global batch g is entries
[g*W*B, (g+1)*W*B) of what remains; rank r takes every W-th entry of it starting at r (so the
repeats of a sample, which are adjacent, land on different ranks, as DeiT's RASampler does). Hence:
- every rank gets the same number of batches: floor(remaining / (W*B)); the documented remainder
  (< W*B entries at the end of the epoch) is dropped;
- resuming is slicing: nothing before `samples_seen` is read or decoded;
- a different world size after a stop (2 -> 1) continues with exactly the entries not yet consumed.

Repeated augmentation (`repeats` = R > 1): each sample is followed by its R-1 repeats and the
sequence is cut back to the split size, so an epoch has the same number of steps and ~N/R distinct
images (DeiT's RASampler behaves the same way).

Locality (`blocks`): for WebDataset the order permutes shards and shuffles samples only inside
windows of consecutive (permuted) shards holding >= `window` samples, so at any time all ranks
read the same few shards (page cache and read-ahead stay useful) instead of the whole dataset.
FFCV reads a memory-mapped file by offset and gets one global shuffle.

Sample keys: every random choice about an entry (crop, flip, RandAugment, erasing) derives from
`sample_keys(seed, epoch, index, repeat)`, a 64-bit splitmix hash. `mix64`/`uniforms` use only
uint64 arithmetic, so the same code runs on numpy arrays here and compiled by numba inside FFCV's
decoder, with identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S11, _S27, _S30, _S31 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31)
_TO_UNIT = 2.0**-53

# Stream salts: different random choices of one entry use independent hash streams.
STREAM_CROP = 1
STREAM_PIL = 2  # RandAugment / color jitter (seeds python `random` and numpy's global RNG)
STREAM_ERASE = 3
STREAM_MIX = 4
STREAM_ORDER = 5


def mix64(z):
    """splitmix64 finaliser on uint64 scalars (numba) or arrays (numpy)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def combine(h, v):
    """Hash of (h, v) for uint64 h and v."""
    return mix64(h ^ mix64(v + _GOLDEN))


def uniform(key, k):
    """k-th float in [0, 1) of the stream `key` (uint64); elementwise on arrays."""
    return (mix64(key + (k + np.uint64(1)) * _GOLDEN) >> _S11) * _TO_UNIT


def _u64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64).astype(np.uint64)


def sample_keys(seed: int, epoch: int, index, repeat, stream: int):
    """uint64 keys of entries (index, repeat) of `epoch`, for one `stream` of random choices."""
    h = combine(_u64([seed]), _u64([stream]))
    h = combine(h, _u64([epoch]))
    return combine(combine(h, _u64(index)), _u64(repeat))


def _rng(seed: int, epoch: int) -> np.random.Generator:
    key = sample_keys(seed, epoch, [0], [0], STREAM_ORDER)[0]
    return np.random.default_rng(int(key))


def epoch_order(num_samples: int, seed: int, epoch: int, repeats: int = 1,
                blocks: list[tuple[int, int]] | None = None, window: int | None = None):
    """(indices, repeats) int64 arrays of length `num_samples`: the epoch's global entry order.

    `blocks` = [(first_index, count), ...] covering 0..num_samples (shards); with `window` the
    shuffle is local to windows of consecutive permuted blocks (see module docstring).
    """
    rng = _rng(seed, epoch)
    if blocks is None or window is None or window >= num_samples:
        order = rng.permutation(num_samples)
    else:
        parts, pending, pending_n = [], [], 0
        for b in rng.permutation(len(blocks)):
            first, count = blocks[b]
            pending.append(np.arange(first, first + count))
            pending_n += count
            if pending_n >= window:
                parts.append(rng.permutation(np.concatenate(pending)))
                pending, pending_n = [], 0
        if pending:
            parts.append(rng.permutation(np.concatenate(pending)))
        order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    order = order.astype(np.int64)
    if repeats > 1:
        idx = np.repeat(order, repeats)[:num_samples]
        rep = np.tile(np.arange(repeats, dtype=np.int64), len(order))[:num_samples]
    else:
        idx, rep = order, np.zeros(num_samples, dtype=np.int64)
    return idx, rep


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads for the rest of an epoch: `indices`/`repeats` of shape (batches, B)."""

    epoch: int
    start: int  # global entries consumed before this plan's first batch
    world_size: int
    indices: np.ndarray
    repeats: np.ndarray

    @property
    def num_batches(self) -> int:
        return int(self.indices.shape[0])

    def batch_start(self, b: int) -> int:
        """Global position (entries consumed) before batch `b` of this plan."""
        return self.start + b * self.world_size * self.indices.shape[1]


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


def rank_plan(order: tuple[np.ndarray, np.ndarray], epoch: int, start: int, batch_size: int,
              rank: int, world_size: int) -> RankPlan:
    """Rank `rank`'s share of the global batches that follow the first `start` entries."""
    idx, rep = order
    gb = batch_size * world_size
    n = (len(idx) - start) // gb if start < len(idx) else 0
    sl = slice(start, start + n * gb)

    def split(a: np.ndarray) -> np.ndarray:
        return a[sl].reshape(n, batch_size, world_size)[:, :, rank].copy()

    return RankPlan(epoch, start, world_size, split(idx), split(rep))


def val_range(num_samples: int, rank: int, world_size: int) -> range:
    """Contiguous share of the val split for `rank`: every sample on exactly one rank, no padding."""
    lo = num_samples * rank // world_size
    hi = num_samples * (rank + 1) // world_size
    return range(lo, hi)
