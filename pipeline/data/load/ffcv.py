"""FFCV .beton reading: FFCV's numba decode + keyed crop + PIL stage, or (decode=device) the JPEG bytes.

How the order gets in: we do not use FFCV's own orderings. `distributed=True` in FFCV works only
with RANDOM and SEQUENTIAL (QUASI_RANDOM raises), emulates DistributedSampler (padding by repeating
samples, so val would count some images twice) and has no resume position. Instead every loader
worker owns one FFCV `Loader` (1 numba thread, built and compiled once in the parent before the
workers fork) and sets its traversal order to exactly the entries of the batches it produces.

Each order entry is a code `index + N * (repeat + R * epoch)`: the decoder (a subclass of FFCV's
`ResizedCropRGBImageDecoder`) recovers (index, repeat, epoch), derives the entry key and takes the
RandomResizedCrop box from `augment.rrc_box` compiled by numba, so a sample's crop is the same box
as in the WebDataset loader. FFCV's decoder decodes the full JPEG (libjpeg-turbo) and resizes the
box with OpenCV's INTER_AREA, not antialiased bicubic: the one difference in the operations (the
README lists every difference between the formats). Val uses the same decoder with a center box.
RandAugment needs PIL, which numba cannot call, so it runs in the worker right after FFCV hands
over the uint8 batch. Labels come straight from the .beton's metadata table (no decoding).

A JPEG that libjpeg-turbo cannot decode is filled with a sentinel pattern by the decoder (numba
cannot raise through FFCV's reader thread without hanging it) and reported here like in wds.

With data.decode=device no FFCV `Loader` is built: `FfcvReader.read` takes a sample's stored JPEG
bytes (or raw pixels) straight from the file through the metadata's data pointer and the allocation
table's size, and the batch goes to the device as in wds (device_batches.py).

A .beton written with LABELS has a `tlm` field (the label maps): FFCV's pipeline skips it; with
`label_maps` each train batch also carries its `label_targets.LabelTargets`, the maps read straight
from the file through the field's pointers, on either path.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from pipeline.data import label_maps
from pipeline.data.errors import DataError
from pipeline.data.load.augment import N_CROP_UNIFORMS, RRC_LOG_RATIO, RRC_SCALE, rrc_box, seeded_pil_rngs
from pipeline.data.load.label_targets import batch_targets
from pipeline.data.load.sampler import STREAM_CROP, combine, uniform
from pipeline.data.load.wds import bad_sample, drop_bad, fill_bad

_SENTINEL = (7, 251, 13)  # RGB of a decode failure, written over the whole crop
_LOADERS: dict[tuple, object] = {}  # FFCV reads the order at iter() time, so sharing is safe


def _is_sentinel(img: np.ndarray) -> bool:
    return bool(img[0, 0, 0] == _SENTINEL[0] and (img == np.asarray(_SENTINEL, np.uint8)).all())


def _keep_torch_threads(fn, *args, **kwargs):
    """FFCV's Compiler.set_num_threads also sets torch's thread count; keep the caller's."""
    n = torch.get_num_threads()
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(n)


def _u64(x: int) -> np.ndarray:
    return np.asarray([x], np.int64).astype(np.uint64)


def _jitted_hash():
    """numba versions of sampler.uniform/combine (the same code, with mix64 compiled too)."""
    import types

    import numba

    from pipeline.data.load import sampler

    mix = numba.njit(sampler.mix64)
    glb = {**sampler.__dict__, "mix64": mix}
    uniform_j = numba.njit(types.FunctionType(uniform.__code__, glb))
    combine_j = numba.njit(types.FunctionType(combine.__code__, glb))
    return uniform_j, combine_j


def _decoders(num_samples: int, repeats: int, seed: int, center_ratio: float | None = None):
    """FFCV decoder class: keyed RandomResizedCrop (train) or, with `center_ratio`, a center crop of
    that fraction of the shorter side (val). Both mark undecodable JPEGs with the sentinel."""
    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder, get_center_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class KeyedCropDecoder(ResizedCropRGBImageDecoder):
        """Decoder whose crop box comes from the entry key (see module docstring)."""

        def declare_state_and_memory(self, previous_state):
            state, (out_query, _) = super().declare_state_and_memory(previous_state)
            return state, AllocationQuery(out_query.shape, out_query.dtype)

        @property
        def get_crop_generator(self):  # abstract in FFCV; our generate_code picks the box itself
            return rrc_box

        def generate_code(self):
            mem_read = self.memory_read
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            box_c = Compiler.compile(rrc_box)
            center_c = Compiler.compile(get_center_crop)
            uniform_c, combine_c = _jitted_hash()
            n = np.uint64(num_samples)
            r = np.uint64(repeats)
            seed_stream = combine(_u64(seed), _u64(STREAM_CROP))[0]
            n_u = N_CROP_UNIFORMS
            s_lo, s_hi = RRC_SCALE
            r_lo, r_hi = RRC_LOG_RATIO
            center = center_ratio is not None
            ratio = float(center_ratio or 1.0)
            sentinel = np.asarray(_SENTINEL, np.uint8)

            def decode(batch_indices, destination, metadata, storage_state):
                for dst_ix in range(len(batch_indices)):
                    code = np.uint64(batch_indices[dst_ix])
                    index = code % n
                    field = metadata[index]
                    data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == 0:
                        full = np.empty(np.int64(height) * np.int64(width) * 3, np.uint8)
                        status = imdecode_c(data, full, height, width, height, width,
                                            0, 0, 1, 1, False, False)
                        if status != 0:
                            for c in range(3):
                                destination[dst_ix][:, :, c] = sentinel[c]
                            continue
                        image = full.reshape(height, width, 3)
                    else:
                        image = data.reshape(height, width, 3)
                    if center:
                        top, left, h, w = center_c(np.int64(height), np.int64(width), 0.0, ratio)
                    else:
                        rest = code // n
                        key = combine_c(combine_c(combine_c(seed_stream, rest // r), index), rest % r)
                        u = np.empty(n_u, np.float64)
                        for k in range(n_u):
                            u[k] = uniform_c(key, np.uint64(k))
                        top, left, h, w = box_c(np.int64(height), np.int64(width), u, s_lo, s_hi, r_lo, r_hi)
                    resize_crop_c(image, top, top + h, left, left + w, destination[dst_ix])
                return destination[: len(batch_indices)]

            return decode

    return KeyedCropDecoder


class FfcvReader:
    """A .beton of one split: metadata, labels, and FFCV `Loader`s with a settable order."""

    def __init__(self, root: str, split: str, entry: dict):
        self.path = os.path.join(root, "ffcv", entry["name"])
        if not os.path.isfile(self.path):
            raise DataError(f"FFCV file {entry['name']} is missing ({self.path}); rebuild the shards "
                            f"(make shards FORMATS='wds ffcv')")
        from ffcv.reader import Reader

        try:
            reader = Reader(self.path)
        except Exception as e:
            raise DataError(f"FFCV file {entry['name']} is unreadable ({e}); rebuild the shards") from None
        if reader.field_names[:2] != ["image", "label"]:
            raise DataError(f"FFCV file {entry['name']} has fields {reader.field_names}, expected "
                            f"['image', 'label']; rebuild the shards")
        self.name = entry["name"]
        self.num_samples = int(reader.num_samples)
        if self.num_samples != int(entry["num_samples"]):
            raise DataError(f"FFCV file {self.name} holds {self.num_samples} samples but manifest.json says "
                            f"{entry['num_samples']}; rebuild the shards")
        self.labels = np.asarray(reader.metadata["f1"], np.int64)
        image = reader.metadata["f0"]
        self.heights = np.asarray(image["height"], np.int64)
        self.widths = np.asarray(image["width"], np.int64)
        self.jpeg = np.asarray(image["mode"]) == 0  # FFCV's RGBImageField: 0 JPEG, 1 raw RGB
        self.ptrs = np.asarray(image["data_ptr"], np.int64)
        alloc = reader.alloc_table
        order = np.argsort(alloc["ptr"], kind="stable")
        at = np.minimum(np.searchsorted(alloc["ptr"][order], self.ptrs), len(order) - 1)
        if not np.array_equal(alloc["ptr"][order][at], self.ptrs):
            raise DataError(f"FFCV file {self.name}: an image's data is not in the allocation table; "
                            f"rebuild the shards")
        self.sizes = np.asarray(alloc["size"][order][at], np.int64)
        self.map_ptrs = self.map_sizes = None
        if label_maps.MEMBER in reader.field_names:
            maps = reader.metadata[f"f{reader.field_names.index(label_maps.MEMBER)}"]
            self.map_ptrs, self.map_sizes = (np.asarray(maps[k], np.int64) for k in ("ptr", "size"))
        self._mm = None

    def where(self, index: int) -> str:
        return f"FFCV file {self.name}, sample index {int(index)}"

    def _file(self):
        if self._mm is None:  # read-only map: shared safely by forked workers
            import mmap

            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def read(self, index: int):
        """A sample's stored image without FFCV's decoder: JPEG bytes, or an HWC uint8 array (raw)."""
        mm, start = self._file(), int(self.ptrs[index])
        if self.jpeg[index]:
            return mm[start:start + int(self.sizes[index])]
        h, w = int(self.heights[index]), int(self.widths[index])
        return np.frombuffer(mm, np.uint8, h * w * 3, start).reshape(h, w, 3)

    def read_map(self, index: int) -> bytes:
        """A sample's encoded label map (the `tlm` field)."""
        if self.map_ptrs is None:
            raise DataError(f"FFCV file {self.name} has no {label_maps.MEMBER} field (label maps); rebuild "
                            f"the shards with LABELS (make shards LABELS=<maps>)")
        start = int(self.map_ptrs[index])
        return self._file()[start:start + int(self.map_sizes[index])]

    def encoded(self, indices: np.ndarray, params=None):
        """`device_batches.EncodedBatch` of samples (data.decode=device)."""
        from pipeline.data.load.device_batches import EncodedBatch

        return EncodedBatch([self.read(i) for i in indices.tolist()], self.jpeg[indices],
                            np.ones(len(indices), bool), indices, params)

    def loader(self, batch_size: int, decoder_key: tuple, make_decoder):
        """An FFCV Loader for this file; compiled once per process and decoder (numba takes ~5 s)."""
        key = (self.path, os.path.getmtime(self.path), batch_size, decoder_key)
        if key not in _LOADERS:
            _LOADERS[key] = self._new_loader(batch_size, make_decoder())
        return _LOADERS[key]

    def _new_loader(self, batch_size: int, decoder):
        from ffcv.loader import Loader, OrderOption
        from ffcv.traversal_order.base import TraversalOrder

        class SettableOrder(TraversalOrder):
            order = np.zeros(0, np.uint64)

            def sample_order(self, epoch):
                return self.order

        loader = _keep_torch_threads(
            Loader, self.path, batch_size=batch_size, num_workers=1, os_cache=True,
            order=OrderOption.SEQUENTIAL,
            pipelines={"image": [decoder], "label": None, label_maps.MEMBER: None},  # maps: read_map
            drop_last=False, batches_ahead=2)
        loader.traversal_order = SettableOrder(loader)
        # numba compiles FFCV's stages at their first call: do it here, before loader workers fork,
        # or every worker would compile again (~5 s) at every epoch.
        for _ in _run(loader, np.zeros(1, np.uint64)):
            pass
        return loader


def _run(loader, codes: np.ndarray):
    """Iterate an FFCV loader over `codes` (uint64 order entries), yielding uint8 NHWC batches."""
    loader.traversal_order.order = codes
    loader.first_traversal_order = codes
    from ffcv.loader import epoch_iterator

    epoch_iterator.IS_CUDA = False  # workers never touch CUDA; batches go to the device in the trainer
    threads = torch.get_num_threads()
    it = iter(loader)
    try:
        for (images,) in it:
            torch.set_num_threads(threads)  # FFCV's reader thread sets torch's thread count to its own
            yield images
    finally:
        it.close()
        torch.set_num_threads(threads)


class FfcvTrainBatches:
    """Produces this rank's train batches from the .beton, same contract as WdsTrainBatches."""

    def __init__(self, beton: FfcvReader, augment, skip_bad: bool, batch_size: int, repeats: int, seed: int,
                 device_decode: bool = False, label_maps: bool = False):
        self.beton = beton
        self.label_maps = label_maps  # each batch also carries its LabelTargets
        self.augment = augment
        self.skip_bad = skip_bad
        self.repeats = repeats
        self.device_decode = device_decode  # data.decode=device: no FFCV decoder, send EncodedBatches
        self.where = beton.where
        size = augment.size  # augment: the `aug_params.ParamSource`
        if not device_decode:
            self.loader = beton.loader(batch_size, ("train", repeats, seed, size),
                                       lambda: _decoders(beton.num_samples, repeats, seed)((size, size)))

    def batches(self, plan, batch_ids):
        batch_ids = list(batch_ids)
        if self.device_decode:
            for b in batch_ids:
                indices = plan.indices[b]
                p = self.draw(plan.epoch, indices, plan.repeats[b])
                targets = self.targets(indices, p)
                yield b, self.beton.encoded(indices, p), self.beton.labels[indices], 0, *self.maps(targets)
            return
        if not batch_ids:
            return
        n, r = np.uint64(self.beton.num_samples), np.uint64(self.repeats)
        idx = plan.indices[batch_ids].astype(np.uint64)
        rep = plan.repeats[batch_ids].astype(np.uint64)
        codes = (idx + n * (rep + r * np.uint64(plan.epoch))).reshape(-1)
        params = self.augment
        for b, crops in zip(batch_ids, _run(self.loader, codes), strict=True):
            indices = plan.indices[b]
            p = self.draw(plan.epoch, indices, plan.repeats[b])
            targets = self.targets(indices, p)
            out = np.empty_like(crops)
            ok = np.ones(len(indices), bool)
            with seeded_pil_rngs() as seed:
                for j in range(len(indices)):
                    if _is_sentinel(crops[j]):
                        ok[j] = bad_sample(self.where(indices[j]), ValueError("JPEG decode failed"),
                                           self.skip_bad)
                        continue
                    out[j] = params.apply_cpu(Image.fromarray(crops[j]), p, j, seed)
            yield (b, *fill_bad(out, self.beton.labels[indices], ok, targets or ()), *self.maps(targets))

    def targets(self, indices: np.ndarray, p):
        """The batch's `LabelTargets` (None without `label_maps`), from the stored image sizes."""
        if not self.label_maps:
            return None
        b, ids = self.beton, indices.tolist()
        return batch_targets(p, self.augment.op_names,
                             list(zip(b.heights[indices].tolist(), b.widths[indices].tolist(), strict=True)),
                             [b.read_map(i) for i in ids], lambda j: b.where(ids[j]),
                             (self.augment.size, self.augment.size))

    def maps(self, targets) -> tuple:
        """What follows (images, labels, skipped) in a train batch: (targets,) with label maps, else ()."""
        return (targets,) if self.label_maps else ()

    def draw(self, epoch: int, indices: np.ndarray, repeats: np.ndarray):
        """`TrainParams` of entries; the boxes are those the FFCV decoder takes (stored image sizes)."""
        return self.augment.draw(epoch, indices, repeats, self.beton.heights[indices],
                                 self.beton.widths[indices])


class FfcvValBatches:
    """Val batches: center crop of crop_pct of the shorter side, INTER_AREA resize (FFCV's decoder)."""

    def __init__(self, beton: FfcvReader, size: int, crop_pct: float, skip_bad: bool, batch_size: int,
                 device_decode: bool = False):
        self.beton = beton
        self.skip_bad = skip_bad
        self.device_decode = device_decode
        self.where = beton.where
        n = beton.num_samples
        if not device_decode:
            self.loader = beton.loader(batch_size, ("val", size, crop_pct),
                                       lambda: _decoders(n, 1, 0, center_ratio=crop_pct)((size, size)))

    def batches(self, plan, batch_ids):
        batch_ids = list(batch_ids)
        if self.device_decode:
            for b in batch_ids:
                indices = np.asarray(plan[b], np.int64)
                yield b, self.beton.encoded(indices), self.beton.labels[indices], 0
            return
        if not batch_ids:
            return
        codes = np.concatenate([np.asarray(plan[b], np.uint64) for b in batch_ids])
        for b, images in zip(batch_ids, _run(self.loader, codes), strict=True):
            indices = np.asarray(plan[b], np.int64)
            ok = np.ones(len(indices), bool)
            for j, index in enumerate(indices):
                if _is_sentinel(images[j]):
                    ok[j] = bad_sample(self.where(index), ValueError("JPEG decode failed"), self.skip_bad)
            yield (b, *drop_bad(images.copy(), self.beton.labels[indices], ok))


def train_batches(cfg, section: dict, augment, label_maps: bool = False):
    """(None: no blocks, train batch maker) of the split's ffcv manifest section."""
    beton = FfcvReader(cfg.root, "train", section)
    return None, FfcvTrainBatches(beton, augment, cfg.skip_bad, cfg.batch_size, cfg.repeated_aug, cfg.seed,
                                  cfg.decode == "device", label_maps)


def val_batches(cfg, section: dict):
    beton = FfcvReader(cfg.root, "val", section)
    return FfcvValBatches(beton, cfg.eval_img_size, cfg.crop_pct, cfg.skip_bad, cfg.batch_size,
                          cfg.decode == "device")
