"""Per-sample work of the `shards` command, run in worker processes: read, decode (or reject), encode.

Workers only read and encode (each format's `encode`, `pipeline.data.formats`); the main process
(`pipeline.data.convert.shards`) writes the outputs.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from pipeline.data import label_maps
from pipeline.data.convert.imagenet import InputFile, read_input
from pipeline.data.errors import DataError
from pipeline.data.formats import FORMATS


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


def init_worker() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


@dataclass(frozen=True)
class Encoded:
    """An input file ready to write: per wanted format its payload and a note on any change made to it,
    and its encoded label map (`pipeline.data.label_maps`; None without LABELS)."""

    payloads: dict[str, object]
    notes: dict[str, str | None]
    label_map: bytes | None = None


@dataclass(frozen=True)
class Rejected:
    """An input file that cannot be used, and why (listed in the manifest, never dropped silently);
    `label_map`: the image is fine, its label map (LABELS) is missing or damaged."""

    reason: str
    label_map: bool = False


def process_chunk(entries: list[InputFile], formats: tuple[str, ...], opts: dict,
                  labels: str | None = None) -> list[Encoded | Rejected]:
    """An `Encoded` (payloads for `formats`; with `labels`, a label-map folder, the entry's map) or a
    `Rejected` (also for a missing or malformed map) per entry."""
    writers = [FORMATS[f].writer_module() for f in formats]
    full = any(w.needs_pixels(opts) for w in writers)
    out: list[Encoded | Rejected] = []
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
        label_map = None
        if labels is not None:
            try:
                label_map = label_maps.encode(*label_maps.read_pt(labels, e.key, opts["classes"]))
            except DataError as err:
                out.append(Rejected(str(err), label_map=True))
                continue
        done = {f: w.encode(data, im, e.key, opts) for f, w in zip(formats, writers, strict=True)}
        out.append(Encoded({f: p for f, (p, _) in done.items()}, {f: n for f, (_, n) in done.items()},
                           label_map))
    return out
