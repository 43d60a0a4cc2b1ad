"""The `verify-shards` command: re-read a shards folder and check it against its manifest.

Checks, per split and format: every listed file exists with the listed size and sha256; no
unlisted shard files; sample counts and `first_index` add up; `files_found` = written + rejected;
every WebDataset sample has one image and one `.cls` (and a `.tlm` label map that decodes, with
class indices in range, where the split was written with LABELS), every key occurs exactly once; labels are
in [0, len(classes)); every image decodes; the .beton has the contract's fields, and its labels
equal the WebDataset labels sample by sample (with LABELS, its `tlm` field holds a map that decodes,
class indices in range, for every sample). Files are checked in parallel worker processes.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import label_maps, manifest
from pipeline.data.convert.outputs import sha256_file
from pipeline.data.convert.shards import default_workers
from pipeline.data.errors import DataError

IMAGE_EXTS = ("jpg", "png")


def _check_file(path: Path, listed: dict) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing"]
    size = path.stat().st_size
    if size != listed["bytes"]:
        return [f"{path}: {size} bytes, manifest says {listed['bytes']}"]
    if sha256_file(path) != listed["sha256"]:
        return [f"{path}: sha256 differs from the manifest (file damaged or replaced)"]
    return []


def _decodes(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_wds_shard(path: str, listed: dict, num_classes: int,
                    with_maps: bool = False) -> tuple[list[str], list[str], list[int]]:
    """(problems, keys, labels) of one shard, in file order."""
    problems = _check_file(Path(path), listed)
    if problems:
        return problems, [], []
    groups: list[tuple[str, dict[str, bytes]]] = []  # consecutive members of one key = one sample
    try:
        with tarfile.open(path, "r:") as t:
            for m in t:
                key, _, ext = Path(m.name).name.partition(".")
                if not groups or groups[-1][0] != key or ext in groups[-1][1]:
                    groups.append((key, {}))
                groups[-1][1][ext] = t.extractfile(m).read()
    except (tarfile.TarError, OSError) as e:
        return [f"{path}: not a readable tar ({e})"], [], []
    labels = []
    for key, members in groups:
        images = [e for e in members if e in IMAGE_EXTS]
        expected = ["cls", label_maps.MEMBER] if with_maps else ["cls"]
        if sorted(members) != sorted(images + expected) or len(images) != 1:
            problems.append(f"{path}: {key} has members {sorted(members)}, expected one image and "
                            + " and ".join(expected))
            labels.append(-1)
            continue
        text = members["cls"].decode("ascii", "replace")
        label = int(text) if text.isdigit() else -1
        if not 0 <= label < num_classes:
            problems.append(f"{path}: {key} has label {text!r}, outside [0, {num_classes})")
        labels.append(label)
        if (why := _decodes(members[images[0]])) is not None:
            problems.append(f"{path}: {key}.{images[0]} does not decode ({why})")
        if with_maps and (why := _map_problem(members[label_maps.MEMBER], key, num_classes)) is not None:
            problems.append(f"{path}: {why}")
    if len(groups) != listed["num_samples"]:
        problems.append(f"{path}: {len(groups)} samples, manifest says {listed['num_samples']}")
    return problems, [key for key, _ in groups], labels


def _map_problem(data: bytes, key: str, num_classes: int) -> str | None:
    """Why an encoded label map (of sample `key`) is unusable, or None."""
    try:
        _, indices = label_maps.decode(data, key)
    except DataError as e:
        return str(e)
    if indices.max() >= num_classes:
        return f"label map of {key} has class indices >= {num_classes}"
    return None


def check_beton_maps(path: str, records: np.ndarray, num_classes: int) -> list[str]:
    """Decode the label maps of a .beton whose (index, ptr, size) are `records`."""
    with open(path, "rb") as f:
        return [f"{path}: {why}" for index, ptr, size in records.tolist()
                if (why := _map_problem(os.pread(f.fileno(), size, ptr), f"sample index {index}",
                                        num_classes)) is not None]


def check_beton_images(path: str, records: np.ndarray) -> list[str]:
    """Decode the images of a .beton whose (index, mode, width, height, ptr, size) are `records`."""
    import cv2

    problems = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for index, mode, width, height, ptr, size in records.tolist():
            data = os.pread(fd, size, ptr)
            if mode == 0:  # jpg
                img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                ok = img is not None and img.shape == (height, width, 3)
            else:  # raw
                ok = len(data) == width * height * 3
            if not ok:
                problems.append(f"{path}: image {index} does not decode to {width}x{height} RGB")
    finally:
        os.close(fd)
    return problems


def _beton(path: Path, listed: dict, num_classes: int, pool, workers: int, with_maps: bool = False):
    """(problems, labels, futures of image and map checks) of one .beton."""
    problems = _check_file(path, listed)
    if problems:
        return problems, None, []
    from ffcv.fields import BytesField, IntField, RGBImageField
    from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
    except Exception as e:
        return [f"{path}: FFCV cannot read it ({e})"], None, []
    kinds = {name: type(h) for name, h in reader.handlers.items()}
    expected = [("image", RGBImageField), ("label", IntField)] + with_maps * [(label_maps.MEMBER, BytesField)]
    if list(kinds.items()) != expected:
        want = ", ".join(f"{name} ({kind.__name__})" for name, kind in expected)
        return [f"{path}: fields {kinds}, expected {want}"], None, []
    if reader.num_samples != listed["num_samples"]:
        problems.append(f"{path}: {reader.num_samples} samples, manifest says {listed['num_samples']}")
    image, label, *maps = (reader.metadata[n] for n in reader.metadata.dtype.names)
    labels = label.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        problems.append(f"{path}: {bad.size} labels outside [0, {num_classes}), first at index {bad[0]}")
    table, per = reader.alloc_table, len(expected) - 1  # allocations per sample: image (and map)
    n = reader.num_samples
    if len(table) != per * n or not np.array_equal(table["sample_id"], np.repeat(np.arange(n), per)):
        return problems + [f"{path}: allocation table does not list each sample's data once"], labels, []
    table = table.reshape(n, per)
    records = np.stack([np.arange(n), image["mode"], image["width"], image["height"],
                        table["ptr"][:, 0], table["size"][:, 0]], axis=1).astype(np.int64)
    if not np.array_equal(records[:, 4], image["data_ptr"]):
        problems.append(f"{path}: image pointers disagree with the allocation table")
    step = max(1, len(records) // (4 * workers) + 1)
    futures = [pool.submit(check_beton_images, str(path), records[i:i + step])
               for i in range(0, len(records), step)]
    if with_maps:
        if not (np.array_equal(maps[0]["ptr"], table["ptr"][:, 1])
                and np.array_equal(maps[0]["size"], table["size"][:, 1])):
            problems.append(f"{path}: label map pointers disagree with the allocation table")
        map_records = np.stack([np.arange(n), maps[0]["ptr"], maps[0]["size"]], axis=1).astype(np.int64)
        futures += [pool.submit(check_beton_maps, str(path), map_records[i:i + step], num_classes)
                    for i in range(0, n, step)]
    return problems, labels, futures


def _wds(out: Path, split: str, s: dict, num_classes: int, pool, problems: list[str]) -> list:
    """Futures of the shard checks of one split; manifest-level problems go to `problems`."""
    first, futures = 0, []
    for sh in s["wds"]["shards"]:
        if sh["first_index"] != first:
            problems.append(f"{split}: {sh['name']} first_index {sh['first_index']}, expected {first}")
        first += sh["num_samples"]
        futures.append(pool.submit(check_wds_shard, str(out / "wds" / sh["name"]), sh, num_classes,
                                   "label_maps" in s))
    if first != s["num_samples"]:
        problems.append(f"{split}: wds shards hold {first} samples, split says {s['num_samples']}")
    listed = {sh["name"] for sh in s["wds"]["shards"]}
    problems += [f"{p}: not in the manifest" for p in sorted((out / "wds").glob(f"{split}-*.tar"))
                 if p.name not in listed]
    return futures


def verify(out: str | os.PathLike, workers: int | None = None, log=print) -> dict:
    """Check `out` (see module docstring); raise DataError listing every problem found."""
    out = Path(out)
    contents = manifest.read(out, setting="OUT")
    try:
        classes, splits = contents["classes"], contents["splits"]
    except KeyError as e:
        raise DataError(f"{manifest.path(out)} has no {e} entry: run make shards again") from None
    workers = workers or default_workers()
    problems: list[str] = []
    stats = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = []
        for split, s in splits.items():
            if s["num_samples"] + len(s["rejected"]) != s["files_found"]:
                problems.append(f"{split}: {s['num_samples']} written + {len(s['rejected'])} rejected "
                                f"!= {s['files_found']} files found")
            wds = _wds(out, split, s, len(classes), pool, problems) if "wds" in s else None
            beton = None
            if "ffcv" in s:
                if s["ffcv"]["num_samples"] != s["num_samples"]:
                    problems.append(f"{split}: .beton holds {s['ffcv']['num_samples']} samples, "
                                    f"split says {s['num_samples']}")
                beton = _beton(out / "ffcv" / s["ffcv"]["name"], s["ffcv"], len(classes), pool, workers,
                               "label_maps" in s)
            pending.append((split, wds, beton))
        for split, wds, beton in pending:
            keys, labels = [], []
            for f in wds or []:
                p, k, lab = f.result()
                problems += p
                keys += k
                labels += lab
            if wds is not None:
                dup = len(keys) - len(set(keys))
                if dup:
                    problems.append(f"{split}: {dup} keys occur more than once in the wds shards")
            if beton is not None:
                p, beton_labels, futures = beton
                problems += p
                for f in futures:
                    problems += f.result()
                if (wds is not None and beton_labels is not None and len(labels) == len(beton_labels)
                        and not np.array_equal(np.array(labels), beton_labels)):
                    problems.append(f"{split}: .beton labels differ from the wds labels at the same indices")
            stats[split] = len(keys) if wds is not None else splits[split]["num_samples"]
    for p in problems:
        log(f"  problem: {p}")
    if problems:
        raise DataError(f"{len(problems)} problems in {out} (listed above): re-run make shards with the "
                        "same options to redo damaged files")
    log(f"verify-shards: {out} is complete: " + ", ".join(f"{n} {s} samples" for s, n in stats.items())
        + f", {len(classes)} classes; every checksum, key, label and image checked")
    return contents


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", nargs="?", default="shards/imagenet1k",
                        help="shards folder written by `shards` (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")


def run(args: argparse.Namespace) -> int:
    verify(args.out, args.workers)
    return 0
