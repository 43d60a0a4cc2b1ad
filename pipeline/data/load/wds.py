"""WebDataset shards read by random access: a per-shard member index, batch production per worker.

Why random access instead of streaming: the epoch order (sampler.py) is a global sequence of
sample indices, so resume, rank split and world-size changes are exact by construction. Streaming
tar files through shuffle buffers cannot skip to a position without decoding (or at least reading)
what precedes it and splits whole shards over ranks, which cannot give every rank the same number
of batches when shard counts do not divide. A tar member is found through an index of
all shards' member offsets (see ShardSet), built from the tar headers alone and cached on disk.
The windowed shuffle keeps the set of shards being read small and shared by all ranks, so reads stay
within a few shards at a time.

Mapping to sample indices: the i-th sample (group of members sharing a key) of shard s has index
`first_index(s) + i` (data contract); the scan checks the count against manifest.json. A sample's
`.tlm` label map (shards written with LABELS) is indexed beside its image; with `label_maps` a train
batch also carries the batch's `label_targets.LabelTargets`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
from collections import OrderedDict

import numpy as np

from pipeline.data import label_maps
from pipeline.data.errors import DataError
from pipeline.data.load import device_batches  # module, not names: it imports this module too
from pipeline.data.load.augment import ValAugment, open_image, seeded_pil_rngs
from pipeline.data.load.label_targets import batch_targets

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif"})
_OPEN_SHARDS = 32  # open files kept per process
_INDEX_ARRAYS = ("offsets", "sizes", "labels", "headers", "map_offsets", "map_sizes")  # per sample


_ZERO_BLOCK = bytes(512)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _members(mm, name: str):
    """(member name, data offset, size, header offset) of the regular files of a tar in `mm`.

    A direct header walk (checksummed like tarfile's) is ~50x faster than `tarfile` in Python, which
    matters: every shard is indexed at every loader start without a cached index.
    """
    pos, long_name, end = 0, None, len(mm)
    while pos + 512 <= end:
        hdr = mm[pos : pos + 512]
        if hdr == _ZERO_BLOCK:
            return
        if _octal(hdr[148:156]) != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise DataError(f"bad tar header checksum at byte {pos}")
        size, kind = _octal(hdr[124:136]), hdr[156:157]
        data = pos + 512
        if data + size > end:
            raise DataError(f"member at byte {pos} runs past the end of the file (truncated)")
        if kind == b"L":  # GNU long name of the next member
            long_name = bytes(mm[data : data + size]).rstrip(b"\0")
        elif kind == b"x":  # pax header: only its path matters here
            for record in bytes(mm[data : data + size]).split(b"\n"):
                if b" path=" in record:
                    long_name = record.split(b" path=", 1)[1]
        elif kind in (b"0", b"\0", b"7"):
            member = long_name
            if member is None:
                member = hdr[0:100].split(b"\0", 1)[0]
                if hdr[257:262] == b"ustar" and hdr[345:346] != b"\0":
                    member = hdr[345:500].split(b"\0", 1)[0] + b"/" + member
            yield member.decode("utf-8", "surrogateescape"), data, size, pos
            long_name = None
        pos = data + (size + 511) // 512 * 512
    if pos < end or end == 0:
        raise DataError("the file ends inside a tar header (truncated)")


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + stem, ext.lower()


def scan_shard(path: str, name: str, expected: int) -> tuple[np.ndarray, ...]:
    """(image offsets, image sizes, labels, header offsets, map offsets, map sizes) of one tar shard's
    samples, in order (map offset -1: no `.tlm` member).

    Raises DataError naming the shard (and the last good key) when it is missing, corrupt or does
    not hold `expected` samples.
    """
    keys, offsets, sizes, headers, labels, map_offsets, map_sizes = [], [], [], [], [], [], []
    last_key = None
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for member, data, size, header in _members(mm, name):
                key, ext = _split_name(member)
                if not key:  # a cut-off tar reads as a member without a name
                    raise DataError("the tar ends mid-member (truncated)")
                if key != last_key:
                    keys.append(key)
                    offsets.append(-1)
                    sizes.append(0)
                    headers.append(header)
                    labels.append(None)
                    map_offsets.append(-1)
                    map_sizes.append(0)
                    last_key = key
                if ext in IMAGE_EXTS:
                    offsets[-1], sizes[-1], headers[-1] = data, size, header
                elif ext == label_maps.MEMBER:
                    map_offsets[-1], map_sizes[-1] = data, size
                elif ext == "cls":
                    text = bytes(mm[data : data + size])
                    try:
                        labels[-1] = int(text.decode("ascii").strip())
                    except (UnicodeDecodeError, ValueError):
                        raise DataError(f"key {key!r} has label {text[:20]!r}, not a decimal") from None
    except FileNotFoundError:
        raise DataError(f"shard {name} is missing ({path}); rebuild the shards (make shards)") from None
    except (DataError, OSError, ValueError) as e:  # ValueError: mmap of an empty file
        after = f" after key {keys[-1]!r}" if keys else ""
        raise DataError(f"shard {name} is corrupt{after} ({e}); rebuild the shards (make shards)") from None
    for key, off, label in zip(keys, offsets, labels, strict=True):
        if off < 0 or label is None:
            raise DataError(f"shard {name}: sample {key!r} lacks an image or a .cls member; "
                            f"rebuild the shards (make shards)")
    if len(keys) != expected:
        after = f" (last good key {keys[-1]!r})" if keys else ""
        raise DataError(f"shard {name} holds {len(keys)} samples but manifest.json says {expected}{after}: "
                        f"the shard is truncated or corrupt; rebuild the shards (make shards)")
    return tuple(np.asarray(a, np.int64) for a in (offsets, sizes, labels, headers, map_offsets, map_sizes))


class ShardSet:
    """Random access to the samples of one split's tar shards.

    The member index of all shards (24 bytes per sample: ~30 MB for ImageNet train) is built once when
    the loader is built, so forked workers inherit it and no worker ever scans a tar. It is cached
    next to the shards (`wds/.index-<split>-<digest>.npz`, or under ~/.cache/rmt-pipeline when the
    shard folder is read-only); the digest covers the manifest's shard entries and each file's size
    and mtime, so a rewritten or damaged shard is rescanned.
    """

    def __init__(self, root: str, split: str, shards: list[dict]):
        self.dir = os.path.join(root, "wds")
        self.split = split
        self.names = [s["name"] for s in shards]
        counts = np.asarray([int(s["num_samples"]) for s in shards], np.int64)
        firsts = np.asarray([int(s["first_index"]) for s in shards], np.int64)
        order = np.argsort(firsts, kind="stable")
        if not np.array_equal(firsts[order], np.concatenate([[0], np.cumsum(counts[order])[:-1]])):
            raise DataError(f"manifest.json: {split} shards' first_index values do not tile 0..N; "
                            f"rebuild the shards (make shards)")
        self.counts, self.firsts = counts, firsts
        self._sorted_firsts, self._sorted_ids = firsts[order], order
        self.num_samples = int(counts.sum())
        stats = []
        for n in self.names:
            try:
                st = os.stat(os.path.join(self.dir, n))
            except FileNotFoundError:
                missing = [m for m in self.names if not os.path.isfile(os.path.join(self.dir, m))]
                raise DataError(f"shard {n} is missing ({len(missing)} of {len(self.names)} {split} shards "
                                f"missing under {self.dir}); rebuild the shards (make shards)") from None
            stats.append((st.st_size, st.st_mtime_ns))
        ident = json.dumps([shards, stats], sort_keys=True).encode()
        self._digest = hashlib.sha256(ident).hexdigest()[:16]
        self.offsets, self.sizes, self.labels, self.headers, self.map_offsets, self.map_sizes = \
            self._load_index()
        self._files: OrderedDict[int, object] = OrderedDict()
        self._pid = os.getpid()

    def _cache_paths(self) -> list[str]:
        name = f".index-{self.split}-{self._digest}.npz"
        home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return [os.path.join(self.dir, name), os.path.join(home, "rmt-pipeline", "wds-index", name)]

    def _load_index(self):
        for path in self._cache_paths():
            try:
                with np.load(path) as z:
                    arrays = tuple(z[k] for k in _INDEX_ARRAYS)
                if all(len(a) == self.num_samples for a in arrays):
                    return arrays
            except (OSError, KeyError, ValueError):
                continue
        parts = [scan_shard(os.path.join(self.dir, n), n, int(c)) for n, c in zip(self.names, self.counts,
                                                                                   strict=True)]
        by_index = np.argsort(self.firsts, kind="stable")
        arrays = tuple(np.concatenate([parts[i][k] for i in by_index]) for k in range(len(_INDEX_ARRAYS)))
        for path in self._cache_paths():
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp.npz"
                np.savez(tmp, **dict(zip(_INDEX_ARRAYS, arrays, strict=True)))
                os.replace(tmp, path)
                folder, mine = os.path.split(path)
                for old in os.listdir(folder):  # indices of earlier versions of these shards
                    if old.startswith(f".index-{self.split}-") and old.endswith(".npz") and old != mine \
                            and ".tmp." not in old:
                        with contextlib.suppress(OSError):
                            os.remove(os.path.join(folder, old))
                break
            except OSError:
                continue
        return arrays

    def blocks(self) -> list[tuple[int, int]]:
        return [(int(f), int(c)) for f, c in zip(self.firsts, self.counts, strict=True)]

    def locate(self, index: int) -> tuple[int, int]:
        pos = int(np.searchsorted(self._sorted_firsts, index, side="right")) - 1
        s = int(self._sorted_ids[pos])
        return s, index - int(self.firsts[s])

    def _file(self, s: int):
        if os.getpid() != self._pid:  # forked worker: never share file offsets with the parent
            self._files.clear()
            self._pid = os.getpid()
        if s in self._files:
            self._files.move_to_end(s)
            return self._files[s]
        path = os.path.join(self.dir, self.names[s])
        try:
            f = self._files[s] = open(path, "rb")
        except FileNotFoundError:
            raise DataError(f"shard {self.names[s]} is missing ({path}); "
                            f"rebuild the shards (make shards)") from None
        if len(self._files) > _OPEN_SHARDS:
            self._files.popitem(last=False)[1].close()
        return f

    def key(self, index: int) -> str:
        """The key of a sample (read from its tar header; used in messages only)."""
        f = self._file(self.locate(index)[0])
        f.seek(int(self.headers[index]))
        hdr = f.read(512)
        return _split_name(hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))[0]

    def read(self, index: int) -> tuple[bytes, int]:
        """(image bytes, label) of a sample index."""
        f = self._file(self.locate(index)[0])
        f.seek(int(self.offsets[index]))
        size = int(self.sizes[index])
        data = f.read(size)
        if len(data) != size:
            raise DataError(f"{self.where(index)} is truncated; rebuild the shards (make shards)")
        return data, int(self.labels[index])

    def where(self, index: int) -> str:
        return f"shard {self.names[self.locate(index)[0]]}, key {self.key(index)!r}"

    def read_map(self, index: int) -> bytes:
        """The encoded label map (`.tlm` member) of a sample index."""
        if self.map_offsets[index] < 0:
            raise DataError(f"{self.where(index)} has no .{label_maps.MEMBER} label map; rebuild the shards "
                            f"with LABELS (make shards LABELS=<maps>)")
        f = self._file(self.locate(index)[0])
        f.seek(int(self.map_offsets[index]))
        return f.read(int(self.map_sizes[index]))


class _ShardBatches:
    """A batch maker over the shards of one split (`augment`: the split's CPU stage)."""

    def __init__(self, shards: ShardSet, augment, skip_bad: bool, device_decode: bool = False,
                 label_maps: bool = False):
        self.shards = shards
        self.augment = augment
        self.skip_bad = skip_bad
        self.device_decode = device_decode  # data.decode=device: send `device_batches.EncodedBatch`es
        self.label_maps = label_maps  # train: each batch also carries its LabelTargets

    def where(self, index: int) -> str:
        return self.shards.where(int(index))

    def open(self, indices: np.ndarray):
        """(bytes, headers (None: unreadable, reported), labels, ok) of samples; a header is the
        header-parsed PIL image, or on the device path a `device_batches.Header`."""
        peek = device_batches.peek if self.device_decode else open_image
        datas, heads = [], []
        labels = np.empty(len(indices), np.int64)
        ok = np.ones(len(indices), bool)
        for j, index in enumerate(indices.tolist()):
            data, labels[j] = self.shards.read(index)
            datas.append(data)
            try:
                heads.append(peek(data))
            except Exception as e:  # PIL raises many types for bad data
                ok[j] = bad_sample(self.where(index), e, self.skip_bad)
                heads.append(None)
        return datas, heads, labels, ok

    def maps(self, targets) -> tuple:
        """What follows (images, labels, skipped) in a train batch: (targets,) with label maps, else ()."""
        return (targets,) if self.label_maps else ()


class WdsTrainBatches(_ShardBatches):
    """Produces this rank's train batches (uint8 NHWC, labels, skipped[, LabelTargets with label_maps])
    for a plan, batch by batch; `augment` is the `aug_params.ParamSource`."""

    def batches(self, plan, batch_ids):
        for b in batch_ids:
            yield (b, *self.produce(plan.epoch, plan.indices[b], plan.repeats[b]))

    def produce(self, epoch: int, indices: np.ndarray, repeats: np.ndarray):
        params = self.augment
        datas, imgs, labels, ok = self.open(indices)
        sizes = [img.size if img is not None else (1, 1) for img in imgs]
        p = params.draw(epoch, indices, repeats, [h for _, h in sizes], [w for w, _ in sizes])
        targets = None
        if self.label_maps:
            ids = indices.tolist()
            targets = batch_targets(p, params.op_names, [(h, w) for w, h in sizes],
                                    [self.shards.read_map(i) for i in ids],
                                    lambda j: f"sample index {ids[j]} (shard "
                                              f"{self.shards.names[self.shards.locate(ids[j])[0]]})",
                                    (params.size, params.size))
        if self.device_decode:
            return device_batches.encoded(datas, imgs, ok, indices, p), labels, 0, *self.maps(targets)
        out = np.empty((len(indices), params.size, params.size, 3), np.uint8)
        with seeded_pil_rngs() as seed:
            for j, img in enumerate(imgs):
                if img is None:
                    continue
                try:
                    crop = params.augment.decode_box(img, p.boxes[j], p.modes[j] if p.modes else None)
                except Exception as e:  # PIL raises many types for bad data
                    ok[j] = bad_sample(self.where(indices[j]), e, self.skip_bad)
                    continue
                out[j] = params.apply_cpu(crop, p, j, seed)
        return (*fill_bad(out, labels, ok, targets or ()), *self.maps(targets))


class WdsValBatches(_ShardBatches):
    """Produces this rank's val batches: contiguous sample indices, last batch may be short."""

    def batches(self, plan, batch_ids):
        for b in batch_ids:
            indices = plan[b]
            if self.device_decode:
                datas, imgs, labels, ok = self.open(indices)
                yield b, device_batches.encoded(datas, imgs, ok, indices), labels, 0
                continue
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


def fill_bad(images: np.ndarray, labels: np.ndarray, ok: np.ndarray, extra=()):
    """Train: replace skipped samples by the nearest good one of the batch (batch size stays even for
    Mixup and equal on all ranks), in each per-sample array of `extra` too (in place: e.g. the batch's
    LabelTargets). Returns (images, labels, number skipped)."""
    bad = np.flatnonzero(~ok)
    if len(bad):
        good = np.flatnonzero(ok)
        if not len(good):
            raise DataError(f"every image of a batch of {len(ok)} was undecodable; the shards are broken, "
                            f"rebuild them (make shards)")
        for j in bad:
            src = good[np.argmin(np.abs(good - j))]
            images[j], labels[j] = images[src], labels[src]
            for a in extra:
                a[j] = a[src]
    return images, labels, len(bad)


def drop_bad(images: np.ndarray, labels: np.ndarray, ok: np.ndarray):
    """Val: skipped samples are left out (they are counted, never replaced by duplicates)."""
    n_bad = int((~ok).sum())
    if n_bad:
        return images[ok], labels[ok], n_bad
    return images, labels, 0


def train_batches(cfg, section: dict, augment, label_maps: bool = False):
    """(shard blocks for the epoch shuffle, train batch maker) of the split's wds manifest section."""
    shards = ShardSet(cfg.root, "train", section["shards"])
    return shards.blocks(), WdsTrainBatches(shards, augment, cfg.skip_bad, cfg.decode == "device", label_maps)


def val_batches(cfg, section: dict):
    return WdsValBatches(ShardSet(cfg.root, "val", section["shards"]), ValAugment(cfg), cfg.skip_bad,
                         cfg.decode == "device")
