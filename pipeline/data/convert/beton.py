"""FFCV .beton writing: per-sample encoding in any process, page layout in one sequential writer.

Also the `ffcv` format's writer side for `pipeline.data.formats`: one .beton per split. A split
written with LABELS gets a third field, `tlm` (FFCV `BytesField`): each sample's encoded label map
(`pipeline.data.label_maps`), the same bytes as the WebDataset member.

FFCV's own `DatasetWriter` cannot give byte-identical files: with several workers the pages are
claimed in race order and the allocation table is concatenated in the order workers finish, and
its `proportion` mode draws from an unseeded global RNG. Here the expensive part, FFCV's own
`RGBImageField.encode` (resize to `max_resolution`, JPEG or raw), runs in our worker processes
with a per-sample seed, and `BetonWriter` lays the encoded samples out exactly as `DatasetWriter`
does with one worker (header, field descriptors, metadata, zero padding to a page boundary, full
pages, allocation table). With no rejected inputs the bytes equal `DatasetWriter(num_workers=1)`'s
(tests/test_shards_ffcv.py checks this); with rejected inputs the metadata region keeps room for
every input file, an unused zero gap that readers never look at.

Defaults for RMT at 224 (`FFCV_DEFAULTS`): `write_mode="jpg"`, `max_resolution=512`,
`jpeg_quality=90`. RandomResizedCrop takes crops down to 8% of the area and evaluation resizes
the short side to 256, so images keep their full ImageNet size (median 500x375; only the few
larger ones shrink to 512). JPEG keeps the files near the size of ImageNet itself (~140 GB),
which fits a node's page cache or local NVMe; raw pixels at 512 would be ~5x that. Decoding a
500x375 JPEG costs a few ms per CPU core, small next to RMT's per-image training cost (RMT-L:
18.2 GFLOPs forward), and the loaders still run RandAugment after decoding anyway.
`compress_probability` only matters for `write_mode="proportion"`; 0.5 is FFCV's own default.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from pipeline.data.convert.outputs import Output, fsync_dir, plan_hash, sha256_file
from pipeline.data.errors import DataError
from pipeline.data.label_maps import MEMBER as MAP_FIELD

NAME = "ffcv"  # the folder under OUT
STALE_GLOB = "*.beton"
FFCV_DEFAULTS = {"write_mode": "jpg", "max_resolution": 512, "jpeg_quality": 90, "compress_probability": 0.5,
                 "page_size": 1 << 23}
WRITE_MODES = ("jpg", "raw", "smart", "proportion")
# FFCV (numba, OpenCV) takes seconds to import: it is imported only where a .beton is written.


def fields(settings: dict, label_maps: bool = False) -> dict:
    """The contract's FFCV fields, in order: `image`, `label` (and `tlm`, the label maps, with LABELS)."""
    from ffcv.fields import BytesField, IntField, RGBImageField

    image = RGBImageField(write_mode=settings["write_mode"], max_resolution=settings["max_resolution"],
                          jpeg_quality=settings["jpeg_quality"],
                          compress_probability=settings["compress_probability"])
    return {"image": image, "label": IntField(), **({MAP_FIELD: BytesField()} if label_maps else {})}


def encode_image(field, rgb: np.ndarray, seed: int) -> tuple[int, int, int, bytes]:
    """(mode, width, height, payload) of one HxWx3 uint8 image, as FFCV's `RGBImageField` encodes it.

    `seed` fixes FFCV's use of the global numpy RNG (the `proportion` mode's coin flip)."""
    dest = np.zeros(1, dtype=field.metadata_type)
    payload: list[bytes] = []

    def malloc(size: int):
        buf = np.zeros(size, dtype="<u1")
        payload.append(buf)
        return 0, buf

    np.random.seed(seed)
    field.encode(dest[0:1], rgb, malloc)
    return int(dest["mode"][0]), int(dest["width"][0]), int(dest["height"][0]), payload[0].tobytes()


def sample_seed(seed: int, key: str) -> int:
    return zlib.crc32(f"{seed}:{key}".encode())


class BetonWriter:
    """Writes a .beton sequentially: `add()` each sample in index order, then `close()`.

    `capacity` is an upper bound on the number of samples (room reserved for their metadata); with
    `label_maps` every sample also carries its encoded label map (field `tlm`)."""

    def __init__(self, path: str, settings: dict, capacity: int, label_maps: bool = False):
        from ffcv.types import TYPE_ID_HANDLER, FieldDescType, HeaderType, get_metadata_type
        from ffcv.utils import align_to_page

        type_id = {cls: i for i, cls in TYPE_ID_HANDLER.items()}
        self.path = path
        self.fields = fields(settings, label_maps)
        self.label_maps = label_maps
        self.page_size = int(settings["page_size"])
        self.metadata_type = get_metadata_type(list(self.fields.values()))
        self.metadata = np.zeros(capacity, dtype=self.metadata_type)
        self.descriptors = np.zeros(len(self.fields), dtype=FieldDescType)
        for i, (name, f) in enumerate(self.fields.items()):
            self.descriptors[i]["type_id"] = type_id[type(f)]
            encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")
            self.descriptors[i]["name"][: len(encoded)] = encoded
            self.descriptors[i]["arguments"][:] = f.to_binary()[0]
        self.metadata_start = HeaderType.itemsize + self.descriptors.nbytes
        self.data_start = align_to_page(self.metadata_start + self.metadata.nbytes, self.page_size)
        self.file = open(path, "wb")
        self.file.seek(self.data_start)
        self.page = bytearray(self.page_size)
        self.page_used = -1  # no page yet
        self.pages = 0
        self.allocations: list[tuple[int, int, int]] = []
        self.count = 0

    def add(self, image: tuple[int, int, int, bytes], label: int, label_map: bytes | None = None) -> None:
        """One sample; `label_map` exactly when the writer was opened with `label_maps`."""
        if (label_map is not None) != self.label_maps:
            raise ValueError(f"label_map given: {label_map is not None}, but label_maps={self.label_maps}")
        mode, width, height, payload = image
        meta = self.metadata[self.count]
        image_meta = meta[self.metadata_type.names[0]]
        image_meta["mode"], image_meta["width"], image_meta["height"] = mode, width, height
        image_meta["data_ptr"] = self._place(payload, "an image", "lower --ffcv-max-resolution or raise")
        meta[self.metadata_type.names[1]] = label
        if label_map is not None:  # FFCV's DatasetWriter encodes fields in order: the map after the image
            map_meta = meta[self.metadata_type.names[2]]
            map_meta["ptr"] = self._place(label_map, "a label map", "raise")
            map_meta["size"] = len(label_map)
        self.count += 1

    def _place(self, payload: bytes, what: str, fix: str) -> int:
        """Put `payload` on the current page (or a new one), as FFCV's allocator does; its pointer."""
        size = len(payload)
        if size > self.page_size:
            raise DataError(f"{what} needs {size} bytes, more than the FFCV page size {self.page_size}: "
                            f"{fix} --ffcv-page-size")
        if self.page_used < 0 or size > self.page_size - self.page_used:
            self._flush_page()
            self.page_used = 0
        ptr = self.data_start + (self.pages - 1) * self.page_size + self.page_used
        self.page[self.page_used : self.page_used + size] = payload
        self.page_used += size
        self.allocations.append((self.count, ptr, size))
        return ptr

    def _flush_page(self) -> None:
        if self.page_used >= 0:
            self.file.write(self.page)
            self.page[:] = bytes(self.page_size)
        self.pages += 1

    def close(self) -> None:
        """Finish the file: last page, allocation table, metadata, header; fsync."""
        from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

        if self.page_used >= 0:
            self.file.write(self.page)
        table_ptr = self.file.tell()
        self.file.write(np.array(self.allocations, dtype=ALLOC_TABLE_TYPE).tobytes())
        header = np.zeros(1, dtype=HeaderType)[0]
        header["version"] = CURRENT_VERSION
        header["num_samples"] = self.count
        header["num_fields"] = len(self.fields)
        header["page_size"] = self.page_size
        header["alloc_table_ptr"] = table_ptr
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.write(self.descriptors.tobytes())
        self.file.write(self.metadata[: self.count].tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        try:
            self.file.close()  # flushing may fail again (disk full): the file goes anyway
        except OSError:
            pass
        os.unlink(self.path)

    # the format-writer protocol (pipeline.data.formats); `path` ends in ".tmp"
    def put(self, key: str, label: int, payload: tuple[int, int, int, bytes],
            label_map: bytes | None) -> None:
        self.add(payload, label, label_map)

    def finish(self) -> tuple[int, int, str]:
        """Close, rename to the final name; (samples, bytes, sha256)."""
        self.close()
        path = Path(self.path[: -len(".tmp")])
        os.replace(self.path, path)
        fsync_dir(path.parent)
        return self.count, path.stat().st_size, sha256_file(path)


# ---------------------------------------------------------------- the format-writer protocol

def check(opts: dict) -> None:
    """One-line errors for bad --ffcv-* settings."""
    settings = opts["ffcv"]
    if settings["write_mode"] not in WRITE_MODES:
        raise DataError(f"--ffcv-write-mode {settings['write_mode']}: choose one of {', '.join(WRITE_MODES)}")
    if not 1 <= int(settings["jpeg_quality"]) <= 100:
        raise DataError(f"--ffcv-jpeg-quality {settings['jpeg_quality']}: give a quality from 1 to 100")
    if not 0 <= float(settings["compress_probability"]) <= 1:
        raise DataError(f"--ffcv-compress-probability {settings['compress_probability']}: give 0..1")
    page = int(settings["page_size"])
    if page < 1 << 21 or page & (page - 1) or page >= 1 << 32:
        raise DataError(f"--ffcv-page-size {page}: give a power of two from 2 MiB to below 4 GiB")


def preload() -> None:
    """Import FFCV (seconds) once in the parent, so that forked workers inherit it."""
    import ffcv.fields  # noqa: F401


def plan(split: str, order: list, opts: dict) -> list[Output]:
    """One .beton holding the whole split."""
    settings = {"seed": opts["seed"], **opts["ffcv"]}
    if split in opts["labels"]:  # only then: plans (and resume records) without maps stay as they were
        settings["labels"] = opts["labels"][split]
    return [Output(f"{split}.beton", 0, len(order), plan_hash(order, settings))]


def needs_pixels(opts: dict) -> bool:
    return True


_FIELDS: dict = {}  # per worker process: FFCV settings -> RGBImageField


def encode(data: bytes, im, key: str, opts: dict) -> tuple[tuple[int, int, int, bytes], None]:
    """(FFCV image of the decoded `im`, no note), in a worker."""
    settings = tuple(sorted(opts["ffcv"].items()))
    field = _FIELDS.get(settings)
    if field is None:
        field = _FIELDS[settings] = fields(opts["ffcv"])["image"]
    rgb = np.asarray(im.convert("RGB"))
    return encode_image(field, rgb, sample_seed(opts["seed"], key)), None


def open_output(out: Path, output: Output, opts: dict) -> BetonWriter:
    split = output.name[: -len(".beton")]
    return BetonWriter(str(out / NAME / f"{output.name}.tmp"), opts["ffcv"], capacity=output.hi - output.lo,
                       label_maps=split in opts["labels"])


def section(outputs: list[Output], records: dict[str, dict]) -> dict:
    """The split's `ffcv` manifest section (`pipeline.data.manifest`)."""
    name = outputs[0].name
    return {"name": name, **{k: records[name][k] for k in ("num_samples", "bytes", "sha256")}}
