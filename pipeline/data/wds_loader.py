"""WebDataset shards read by random access: a per-shard member index, batch production per worker.

Why random access instead of streaming: the epoch order (sampler.py) is a global sequence of
sample indices, so resume, rank split and world-size changes are exact by construction. Streaming
tar files through shuffle buffers cannot skip to a position without decoding (or at least reading)
what precedes it and splits whole shards over ranks, which cannot give every rank the same number
of batches when shard counts do not divide. A tar member is found by scanning the shard's headers
once (512-byte reads and seeks, no image data; ~10 ms for a 1 GB shard on a local disk). Each
process keeps the indices and open files of the last few shards it touched; the windowed shuffle
keeps that set small and shared by all ranks, so reads stay within a few shards at a time.

Mapping to sample indices: the i-th sample (group of members sharing a key) of shard s has index
`first_index(s) + i` (data contract); the scan checks the count against manifest.json.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pipeline.data.augment import seeded_pil_rngs
from pipeline.data.config import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif"})
_CACHE_SHARDS = 32


@dataclass
class ShardIndex:
    offsets: np.ndarray  # byte offset of each sample's image data
    sizes: np.ndarray  # image byte size
    labels: np.ndarray  # int64
    header_offsets: np.ndarray  # tar header of the image member (to name the key in errors)


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + stem, ext.lower()


def scan_shard(path: str, name: str, expected: int) -> ShardIndex:
    """Index of the samples of one tar shard; raises DataError naming the shard (and key) if bad."""
    keys, offsets, sizes, headers, cls_at = [], [], [], [], []
    last_key = None
    try:
        with open(path, "rb") as f:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_name(m.name)
                    if key != last_key:
                        keys.append(key)
                        offsets.append(-1)
                        sizes.append(0)
                        headers.append(m.offset)
                        cls_at.append(None)
                        last_key = key
                    if ext in IMAGE_EXTS:
                        offsets[-1], sizes[-1], headers[-1] = m.offset_data, m.size, m.offset
                    elif ext == "cls":
                        cls_at[-1] = (m.offset_data, m.size)
            labels = []
            for key, off, at in zip(keys, offsets, cls_at, strict=True):
                if off < 0 or at is None:
                    raise DataError(f"shard {name}: sample {key!r} lacks an image or a .cls member; "
                                    f"rebuild the shards (make shards)")
                f.seek(at[0])
                text = f.read(at[1])
                try:
                    labels.append(int(text.decode("ascii").strip()))
                except (UnicodeDecodeError, ValueError):
                    raise DataError(f"shard {name}: key {key!r} has label {text[:20]!r}, not a decimal; "
                                    f"rebuild the shards (make shards)") from None
    except FileNotFoundError:
        raise DataError(f"shard {name} is missing ({path}); rebuild the shards (make shards)") from None
    except (tarfile.TarError, OSError) as e:
        after = f" after key {keys[-1]!r}" if keys else ""
        raise DataError(f"shard {name} is corrupt{after} ({e}); rebuild the shards (make shards)") from None
    if len(keys) != expected:
        after = f" (last good key {keys[-1]!r})" if keys else ""
        raise DataError(f"shard {name} holds {len(keys)} samples but manifest.json says {expected}{after}: "
                        f"the shard is truncated or corrupt; rebuild the shards (make shards)")
    return ShardIndex(np.asarray(offsets, np.int64), np.asarray(sizes, np.int64),
                      np.asarray(labels, np.int64), np.asarray(headers, np.int64))


class ShardSet:
    """Random access to the samples of one split's tar shards (per process caches of index and files)."""

    def __init__(self, root: str, split: str, shards: list[dict]):
        self.dir = os.path.join(root, "wds")
        self.split = split
        self.names = [s["name"] for s in shards]
        self.counts = np.asarray([int(s["num_samples"]) for s in shards], np.int64)
        self.firsts = np.asarray([int(s["first_index"]) for s in shards], np.int64)
        order = np.argsort(self.firsts)
        if not np.array_equal(self.firsts[order], np.concatenate([[0], np.cumsum(self.counts[order])[:-1]])):
            raise DataError(f"manifest.json: {split} shards' first_index values do not tile 0..N; "
                            f"rebuild the shards (make shards)")
        self._sorted_firsts = self.firsts[order]
        self._sorted_ids = order
        self.num_samples = int(self.counts.sum())
        self._indices: OrderedDict[int, ShardIndex] = OrderedDict()
        self._files: OrderedDict[int, object] = OrderedDict()
        self._pid = os.getpid()
        missing = [n for n in self.names if not os.path.isfile(os.path.join(self.dir, n))]
        if missing:
            raise DataError(f"shard {missing[0]} is missing ({len(missing)} of {len(self.names)} {split} "
                            f"shards missing under {self.dir}); rebuild the shards (make shards)")

    def blocks(self) -> list[tuple[int, int]]:
        return [(int(f), int(c)) for f, c in zip(self.firsts, self.counts, strict=True)]

    def locate(self, index: int) -> tuple[int, int]:
        pos = int(np.searchsorted(self._sorted_firsts, index, side="right")) - 1
        s = int(self._sorted_ids[pos])
        return s, index - int(self.firsts[s])

    def _cached(self, cache: OrderedDict, s: int, make):
        if os.getpid() != self._pid:  # forked worker: never share file offsets with the parent
            self._files.clear()
            self._pid = os.getpid()
        if s in cache:
            cache.move_to_end(s)
            return cache[s]
        value = cache[s] = make()
        if len(cache) > _CACHE_SHARDS:
            _, old = cache.popitem(last=False)
            if hasattr(old, "close"):
                old.close()
        return value

    def index(self, s: int) -> ShardIndex:
        path = os.path.join(self.dir, self.names[s])
        return self._cached(self._indices, s, lambda: scan_shard(path, self.names[s], int(self.counts[s])))

    def key(self, s: int, i: int) -> str:
        """The key of sample i of shard s (read from its tar header; used in messages only)."""
        f = self._file(s)
        f.seek(int(self.index(s).header_offsets[i]))
        info = tarfile.TarInfo.frombuf(f.read(512), tarfile.ENCODING, "surrogateescape")
        return _split_name(info.name)[0]

    def _file(self, s: int):
        path = os.path.join(self.dir, self.names[s])
        try:
            return self._cached(self._files, s, lambda: open(path, "rb"))
        except FileNotFoundError:
            raise DataError(f"shard {self.names[s]} is missing ({path}); "
                            f"rebuild the shards (make shards)") from None

    def read(self, index: int) -> tuple[bytes, int]:
        """(image bytes, label) of a sample index."""
        s, i = self.locate(index)
        idx = self.index(s)
        f = self._file(s)
        f.seek(int(idx.offsets[i]))
        size = int(idx.sizes[i])
        data = f.read(size)
        if len(data) != size:
            raise DataError(f"shard {self.names[s]}: key {self.key(s, i)!r} is truncated; "
                            f"rebuild the shards (make shards)")
        return data, int(idx.labels[i])

    def where(self, index: int) -> str:
        s, i = self.locate(index)
        return f"shard {self.names[s]}, key {self.key(s, i)!r}"


class WdsTrainSource:
    """Produces this rank's train batches (uint8 NHWC, labels) for a plan, batch by batch."""

    def __init__(self, shards: ShardSet, augment, skip_bad: bool):
        self.shards = shards
        self.augment = augment
        self.skip_bad = skip_bad

    def batches(self, plan, batch_ids):
        for b in batch_ids:
            yield (b, *self.produce(plan.epoch, plan.indices[b], plan.repeats[b]))

    def produce(self, epoch: int, indices: np.ndarray, repeats: np.ndarray):
        aug = self.augment
        us = aug.crop_boxes(epoch, indices, repeats)
        keys = aug.pil_keys(epoch, indices, repeats).tolist()
        out = np.empty((len(indices), aug.size, aug.size, 3), np.uint8)
        labels = np.empty(len(indices), np.int64)
        ok = np.ones(len(indices), bool)
        with seeded_pil_rngs() as seed:
            for j, index in enumerate(indices.tolist()):
                data, labels[j] = self.shards.read(index)
                try:
                    img = aug.decode_crop(data, us[j])
                except Exception as e:  # PIL raises many types for bad data
                    ok[j] = bad_sample(self.shards.where(index), e, self.skip_bad)
                    continue
                out[j] = aug.pil_stage(img, us[j, 22], keys[j], seed)
        return fill_bad(out, labels, ok)


class WdsValSource:
    """Produces this rank's val batches: contiguous sample indices, last batch may be short."""

    def __init__(self, shards: ShardSet, augment, skip_bad: bool):
        self.shards = shards
        self.augment = augment
        self.skip_bad = skip_bad

    def batches(self, plan, batch_ids):
        for b in batch_ids:
            indices = plan[b]
            out = np.empty((len(indices), self.augment.size, self.augment.size, 3), np.uint8)
            labels = np.empty(len(indices), np.int64)
            ok = np.ones(len(indices), bool)
            for j, index in enumerate(indices):
                data, labels[j] = self.shards.read(index)
                try:
                    out[j] = self.augment(data)
                except Exception as e:
                    ok[j] = bad_sample(self.shards.where(index), e, self.skip_bad)
            yield (b, *drop_bad(out, labels, ok))


def bad_sample(where: str, e: Exception, skip_bad: bool) -> bool:
    """Raise the error for an undecodable image at `where`, or log it and return False (skip)."""
    if not skip_bad:
        raise DataError(f"{where}: undecodable image ({type(e).__name__}: {e}); fix or drop the "
                        f"source image and rebuild the shards, or set data.skip_bad=true")
    log.warning("skipping undecodable image: %s (%s)", where, e)
    return False


def fill_bad(images: np.ndarray, labels: np.ndarray, ok: np.ndarray):
    """Train: replace skipped samples by the nearest good one of the batch (batch size stays even for
    Mixup and equal on all ranks). Returns (images, labels, number skipped)."""
    bad = np.flatnonzero(~ok)
    if len(bad):
        good = np.flatnonzero(ok)
        if not len(good):
            raise DataError(f"every image of a batch of {len(ok)} was undecodable; the shards are broken, "
                            f"rebuild them (make shards)")
        for j in bad:
            src = good[np.argmin(np.abs(good - j))]
            images[j], labels[j] = images[src], labels[src]
    return images, labels, len(bad)


def drop_bad(images: np.ndarray, labels: np.ndarray, ok: np.ndarray):
    """Val: skipped samples are left out (they are counted, never replaced by duplicates)."""
    n_bad = int((~ok).sum())
    if n_bad:
        return images[ok], labels[ok], n_bad
    return images, labels, 0

