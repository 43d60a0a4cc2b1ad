"""Per-sample work of the `shards` command, run in worker processes: read, decode (or reject), encode.

Workers only read and encode; the main process (`pipeline.data.convert.shards`) writes the outputs.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.convert.imagenet import InputFile, read_input

REENCODE_QUALITY = 95  # CMYK JPEGs, and --max-side without --quality


def decode(data: bytes, full: bool = True) -> tuple[Image.Image | None, str | None]:
    """(decoded image, None) or (None, reason it is rejected).

    With `full=False` a JPEG is decoded at 1/8 scale (libjpeg's DCT scaling): every byte of the
    compressed data is still Huffman-decoded, so truncated and corrupt files fail the same way,
    at a fraction of the cost. Copy mode needs no pixels, only that the file decodes."""
    if not data:
        return None, "zero-byte file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except UnidentifiedImageError:
        return None, "undecodable: not an image format Pillow knows"
    except Exception as e:
        return None, f"{'truncated' if 'truncated' in str(e).lower() else 'undecodable'}: {_why(e)}"
    try:
        im = Image.open(io.BytesIO(data))
        if not full and im.format == "JPEG":
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
    except Exception as e:
        return None, f"truncated or corrupt: {_why(e)}"
    if im.format not in ("JPEG", "PNG"):
        return None, f"unsupported image format {im.format}"
    return im, None


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: " + re.sub(r" at 0x[0-9a-fA-F]+", "", str(e))


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _wds_payload(data: bytes, im: Image.Image, opts: dict) -> tuple[str, bytes, str | None]:
    """(extension, bytes, note on any change) of the image as stored in the WebDataset shard."""
    max_side, quality = opts["max_side"], opts["quality"]
    too_big = max_side is not None and max(im.size) > max_side
    if too_big or quality is not None:
        rgb = im.convert("RGB")
        if too_big:
            scale = max_side / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return "jpg", _jpeg(rgb, quality or REENCODE_QUALITY), None
    if im.format == "PNG":
        return "png", data, None
    if im.mode not in ("RGB", "L"):
        note = f"{im.mode} JPEG re-encoded as RGB JPEG (quality {REENCODE_QUALITY})"
        with Image.open(io.BytesIO(data)) as full:  # `im` may be a reduced-size decode
            return "jpg", _jpeg(full.convert("RGB"), REENCODE_QUALITY), note
    return "jpg", data, None


_FIELDS: dict = {}  # per worker process: FFCV settings -> RGBImageField


def _ffcv_payload(im: Image.Image, key: str, opts: dict):
    from pipeline.data.convert import beton as shard_ffcv

    settings = tuple(sorted(opts["ffcv"].items()))
    field = _FIELDS.get(settings)
    if field is None:
        field = _FIELDS[settings] = shard_ffcv.fields(opts["ffcv"])["image"]
    rgb = np.asarray(im.convert("RGB"))
    return shard_ffcv.encode_image(field, rgb, shard_ffcv.sample_seed(opts["seed"], key))


def init_worker() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


@dataclass(frozen=True)
class Encoded:
    """An input file ready to write: its WebDataset member (`ext`, `wds`; None if not wanted), its FFCV
    image (None if not wanted) and a note on any change made to it."""

    ext: str | None
    wds: bytes | None
    ffcv: tuple | None
    note: str | None


@dataclass(frozen=True)
class Rejected:
    """An input file that cannot be used, and why (listed in the manifest, never dropped silently)."""

    reason: str


def process_chunk(entries: list[InputFile], want_wds: bool, want_ffcv: bool,
                  opts: dict) -> list[Encoded | Rejected]:
    """An `Encoded` or a `Rejected` per entry."""
    out: list[Encoded | Rejected] = []
    full = want_ffcv or opts["max_side"] is not None or opts["quality"] is not None
    for e in entries:
        try:
            data = read_input(e)
        except OSError as err:
            out.append(Rejected(f"unreadable: {err.strerror or err}"))
            continue
        im, reason = decode(data, full)
        if im is None:
            out.append(Rejected(reason))
            continue
        ext, wds_bytes, note = _wds_payload(data, im, opts) if want_wds else (None, None, None)
        ffcv = _ffcv_payload(im, e.key, opts) if want_ffcv else None
        out.append(Encoded(ext, wds_bytes, ffcv, note))
    return out
