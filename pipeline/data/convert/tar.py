"""The WebDataset shard writer: `<key>.<ext>` + `<key>.cls` (+ `<key>.tlm`) tar members, fixed metadata.

Also the `wds` format's writer side for `pipeline.data.formats` (see there): the plan of a split's
shards, the per-sample payload (the original bytes, or a re-encoded JPEG) and the manifest section.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from pipeline.data import label_maps
from pipeline.data.convert.outputs import HashingFile, Output, plan_hash
from pipeline.data.errors import DataError

REENCODE_QUALITY = 95  # CMYK JPEGs, and --max-side without --quality

TAR_MTIME = 0
NAME = "wds"  # the folder under OUT
STALE_GLOB = "*-*.tar"
MEMBER_OVERHEAD = 1536  # two tar headers and padding per sample, for sizing shards


class TarWriter(HashingFile):
    """A WebDataset shard with fixed member metadata, so its bytes depend only on its samples."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.num_samples = 0

    def add(self, key: str, ext: str, data: bytes, label: int, label_map: bytes | None = None) -> None:
        self._member(f"{key}.{ext}", data)
        self._member(f"{key}.cls", str(label).encode("ascii"))
        if label_map is not None:
            self._member(f"{key}.{label_maps.MEMBER}", label_map)
        self.num_samples += 1

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), TAR_MTIME, 0o644, 0, 0
        info.uname = info.gname = ""
        self.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self.write(data)
        if len(data) % tarfile.BLOCKSIZE:
            self.write(bytes(tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))

    def commit(self) -> None:
        end = self.bytes + 2 * tarfile.BLOCKSIZE
        self.write(bytes(2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE))
        super().commit()

    # the format-writer protocol (pipeline.data.formats)
    def put(self, key: str, label: int, payload: tuple[str, bytes], label_map: bytes | None) -> None:
        self.add(key, payload[0], payload[1], label, label_map)

    def finish(self) -> tuple[int, int, str]:
        self.commit()
        return self.num_samples, self.bytes, self.sha.hexdigest()


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------- the format-writer protocol

def check(opts: dict) -> None:
    """One-line errors for bad --quality / --max-side."""
    if opts["quality"] is not None and not 1 <= opts["quality"] <= 100:
        raise DataError(f"--quality {opts['quality']}: give a JPEG quality from 1 to 100")
    if opts["max_side"] is not None and opts["max_side"] < 8:
        raise DataError(f"--max-side {opts['max_side']}: give a side of at least 8 px")


def plan(split: str, order: list, opts: dict) -> list[Output]:
    """Shards of about `opts["shard_bytes"]` each, in the order of `order`."""
    bounds, start, size = [], 0, 0
    for i, e in enumerate(order):
        if i > start and size + e.size + MEMBER_OVERHEAD > opts["shard_bytes"]:
            bounds.append((start, i))
            start, size = i, 0
        size += e.size + MEMBER_OVERHEAD
    bounds.append((start, len(order)))
    wds_opts = {k: opts[k] for k in ("seed", "shard_bytes", "max_side", "quality")}
    if split in opts["labels"]:  # only then: plans (and resume records) without maps stay as they were
        wds_opts["labels"] = opts["labels"][split]
    return [Output(f"{split}-{k:06d}.tar", a, b, plan_hash(order[a:b], wds_opts))
            for k, (a, b) in enumerate(bounds)]


def needs_pixels(opts: dict) -> bool:
    """Whether the worker must decode images fully (only to re-encode them)."""
    return opts["max_side"] is not None or opts["quality"] is not None


def encode(data: bytes, im: Image.Image, key: str, opts: dict) -> tuple[tuple[str, bytes], str | None]:
    """((extension, bytes) of the image as stored in the shard, note on any change), in a worker."""
    max_side, quality = opts["max_side"], opts["quality"]
    too_big = max_side is not None and max(im.size) > max_side
    if too_big or quality is not None:
        rgb = im.convert("RGB")
        if too_big:
            scale = max_side / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return ("jpg", jpeg(rgb, quality or REENCODE_QUALITY)), None
    if im.format == "PNG":
        return ("png", data), None
    if im.mode not in ("RGB", "L"):
        note = f"{im.mode} JPEG re-encoded as RGB JPEG (quality {REENCODE_QUALITY})"
        with Image.open(io.BytesIO(data)) as full:  # `im` may be a reduced-size decode
            return ("jpg", jpeg(full.convert("RGB"), REENCODE_QUALITY)), note
    return ("jpg", data), None


def open_output(out: Path, output: Output, opts: dict) -> TarWriter:
    return TarWriter(out / NAME / output.name)


def section(outputs: list[Output], records: dict[str, dict]) -> dict:
    """The split's `wds` manifest section (`pipeline.data.manifest`)."""
    shards, first = [], 0
    for o in outputs:
        r = records[o.name]
        shards.append({"name": o.name, "num_samples": r["num_samples"], "bytes": r["bytes"],
                       "sha256": r["sha256"], "first_index": first})
        first += r["num_samples"]
    return {"shards": shards, "num_samples": first, "bytes": sum(s["bytes"] for s in shards)}
