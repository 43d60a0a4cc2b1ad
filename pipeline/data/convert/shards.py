"""The `shards` command: ImageNet into WebDataset shards and FFCV .beton files, resumable and exact.

Output (docs: README "Shards"; format fixed by the data contract):

    OUT/manifest.json   classes, options, source, per split: samples, rejected files, shards, checksums
    OUT/wds/<split>-NNNNNN.tar     <key>.jpg (or .png) + <key>.cls, in one seeded global permutation
    OUT/ffcv/<split>.beton         the same samples in the same order (index i = i-th wds sample)
    OUT/.state/<file>.json         resume records: one per finished output file

Every input file is decoded in a worker (PIL `verify()` then `load()`); files that fail are
rejected and listed, never dropped silently. Workers only read and encode; the main process
writes every output file sequentially, so the bytes do not depend on `--workers` or timing.
Each output is written as `<name>.tmp`, fsynced and renamed; its record (plan hash, size,
sha256) is written after it. A re-run skips every file whose record matches the current plan
and whose bytes still hash to the record, and redoes the rest: outputs after any kill are the
bytes an uninterrupted run writes. A .beton is one file, so an interrupted one is redone whole.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import manifest
from pipeline.data.convert.beton import FFCV_DEFAULTS, WRITE_MODES
from pipeline.data.convert.encode import REENCODE_QUALITY, Rejected, init_worker, process_chunk
from pipeline.data.convert.imagenet import ImageNetInput, InputFile, detect
from pipeline.data.convert.outputs import finished, fsync_dir, sha256_file, write_json
from pipeline.data.convert.tar import TarWriter
from pipeline.data.errors import DataError

FORMATS = ("wds", "ffcv")
SPLITS = ("train", "val")
CHUNK = 16  # samples per worker task
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- planning

@dataclass
class Shard:
    name: str
    entries: list[InputFile]
    plan: str  # hash of what determines the shard's bytes


def plan_split(split: str, entries: list[InputFile], opts: dict) -> tuple[list[InputFile], list[Shard], str]:
    """(entries in the seeded global permutation, WebDataset shards, plan hash of the .beton)."""
    ordered = sorted(entries, key=lambda e: e.key)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.key == b.key:
            raise DataError(f"two {split} files have the key {a.key}: {a.path} and {b.path}; remove one")
    dotted = [e.path for e in ordered if "." in e.key]
    if dotted:
        raise DataError(f"{split} file names must have no '.' before the extension: {dotted[0]}; rename them")
    rng = np.random.default_rng([opts["seed"], SPLITS.index(split)])
    order = [ordered[i] for i in rng.permutation(len(ordered))]
    wds_opts = {k: opts[k] for k in ("seed", "shard_bytes", "max_side", "quality")}
    shards, start, size = [], 0, 0
    for i, e in enumerate(order):
        if i > start and size + e.size + 1536 > opts["shard_bytes"]:
            shards.append((start, i))
            start, size = i, 0
        size += e.size + 1536  # two tar headers and padding
    shards.append((start, len(order)))
    out = [
        Shard(f"{split}-{k:06d}.tar", order[a:b], _plan_hash(order[a:b], wds_opts))
        for k, (a, b) in enumerate(shards)
    ]
    ffcv_opts = {"seed": opts["seed"], **opts["ffcv"]}
    return order, out, _plan_hash(order, ffcv_opts)


def _plan_hash(entries: list[InputFile], opts: dict) -> str:
    h = hashlib.sha256(json.dumps(opts, sort_keys=True).encode())
    for e in entries:
        h.update(f"{e.key}\t{e.label}\t{e.size}\t{e.path}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- the run

@dataclass
class SplitJob:
    split: str
    order: list[InputFile]
    shards: list[Shard]
    ffcv_plan: str
    records: dict[str, dict]  # finished file name -> record
    todo_wds: set[str]
    need_ffcv: bool


def _display(path: str, src: str) -> str:
    return os.path.relpath(path, src) if path.startswith(src + os.sep) else path


def write_shards(src: str, out: str | os.PathLike, formats=FORMATS, workers: int | None = None,
                 seed: int = 0, shard_bytes: int = 10**9, max_side: int | None = None,
                 quality: int | None = None, ffcv: dict | None = None, classes: int = 1000,
                 allow_bad: int = 0, progress: bool = True, log=print) -> dict:
    """Write shards of `src` into `out` (see module docstring); returns the manifest."""
    try:
        return _write_shards(src, Path(out), formats, workers, seed, shard_bytes, max_side, quality, ffcv,
                             classes, allow_bad, progress, log)
    except OSError as e:
        if e.errno in _DISK_ERRNOS:
            raise DataError(
                f"no space left writing into {out} ({e.strerror}): free space or pick another OUT, "
                "then re-run; finished files are kept"
            ) from e
        raise


def _write_shards(src, out: Path, formats, workers, seed, shard_bytes, max_side, quality, ffcv, classes,
                  allow_bad, progress, log) -> dict:
    formats = [f for f in FORMATS if f in formats]
    if not formats:
        raise DataError(f"no output format chosen: FORMATS must name one or both of {' '.join(FORMATS)}")
    ffcv_settings = {**FFCV_DEFAULTS, **(ffcv or {})}
    if "ffcv" in formats:
        _check_ffcv(ffcv_settings)
    if quality is not None and not 1 <= quality <= 100:
        raise DataError(f"--quality {quality}: give a JPEG quality from 1 to 100")
    if max_side is not None and max_side < 8:
        raise DataError(f"--max-side {max_side}: give a side of at least 8 px")
    opts = {"seed": seed, "shard_bytes": int(shard_bytes), "max_side": max_side, "quality": quality,
            "ffcv": ffcv_settings}
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DataError(f"--workers {workers}: give at least 1 (default: all cores)")
    inputs = detect(src, classes)
    lock = _prepare_out(out, formats)
    try:
        return _write_locked(inputs, out, formats, workers, opts, allow_bad, progress, log)
    finally:
        lock.close()


def _write_locked(inputs: ImageNetInput, out: Path, formats, workers: int, opts: dict, allow_bad: int,
                  progress, log) -> dict:
    jobs = []
    for split in SPLITS:
        order, shards, ffcv_plan = plan_split(split, inputs.splits[split], opts)
        records = {}
        if "wds" in formats:
            for s in shards:
                if (r := finished(out, f"wds/{s.name}", s.plan)) is not None:
                    records[s.name] = r
        if "ffcv" in formats and (r := finished(out, f"ffcv/{split}.beton", ffcv_plan)) is not None:
            records[f"{split}.beton"] = r
        todo = {s.name for s in shards if "wds" in formats and s.name not in records}
        need_ffcv = "ffcv" in formats and f"{split}.beton" not in records
        jobs.append(SplitJob(split, order, shards, ffcv_plan, records, todo, need_ffcv))

    todo_samples = sum(
        len(s.entries) for j in jobs for s in j.shards if j.need_ffcv or s.name in j.todo_wds
    )
    skipped = sum(len(j.records) for j in jobs)
    log(f"shards: {inputs.layout} layout at {inputs.path}: {len(inputs.classes)} classes, "
        + ", ".join(f"{len(j.order)} {j.split} files" for j in jobs)
        + f"; {skipped} output files already complete, {todo_samples} images to process"
        + f" with {workers} workers")
    if todo_samples:  # OUT is about to change: no manifest until it is complete again
        manifest.path(out).unlink(missing_ok=True)
    if "ffcv" in formats and todo_samples:
        import ffcv.fields  # noqa: F401 (seconds to import: once here, inherited by the forked workers)
    start = time.monotonic()
    bar = None
    if progress and todo_samples:
        from tqdm import tqdm

        tqdm.monitor_interval = 0
        bar = tqdm(total=todo_samples, unit="img", desc="shards", dynamic_ncols=True, smoothing=0.05)
    try:
        with ProcessPoolExecutor(max_workers=workers, initializer=init_worker) as pool:
            for job in jobs:
                _run_split(job, out, opts, pool, workers, bar, inputs.path)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.monotonic() - start

    contents = _manifest(inputs, jobs, formats, opts, allow_bad)
    _remove_stale(out, jobs, formats)
    rejected = [r for j in jobs for r in contents["splits"][j.split]["rejected"]]
    _summary(contents, todo_samples, elapsed, log)
    if len(rejected) > allow_bad:
        write_json(out / "rejected.json", rejected)
        raise DataError(
            f"{len(rejected)} input files could not be decoded (listed above and in "
            f"{out / 'rejected.json'}); remove or replace them, or accept them with "
            f"--allow-bad {len(rejected)} (finished files are kept)"
        )
    (out / "rejected.json").unlink(missing_ok=True)
    write_json(manifest.path(out), contents)
    return contents


def _check_ffcv(settings: dict) -> None:
    if settings["write_mode"] not in WRITE_MODES:
        raise DataError(f"--ffcv-write-mode {settings['write_mode']}: choose one of {', '.join(WRITE_MODES)}")
    if not 1 <= int(settings["jpeg_quality"]) <= 100:
        raise DataError(f"--ffcv-jpeg-quality {settings['jpeg_quality']}: give a quality from 1 to 100")
    if not 0 <= float(settings["compress_probability"]) <= 1:
        raise DataError(f"--ffcv-compress-probability {settings['compress_probability']}: give 0..1")
    page = int(settings["page_size"])
    if page < 1 << 21 or page & (page - 1) or page >= 1 << 32:
        raise DataError(f"--ffcv-page-size {page}: give a power of two from 2 MiB to below 4 GiB")


def _prepare_out(out: Path, formats):
    """Create OUT's folders, take OUT's lock (returned: hold it for the run), delete stale temp files."""
    try:
        (out / ".state").mkdir(parents=True, exist_ok=True)
        lock = open(out / ".state" / "lock", "w")
    except OSError as e:
        raise DataError(f"OUT {out} is not writable ({e.strerror or e}): pick another OUT or fix it") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.close()
        raise DataError(f"another shards run is writing into {out}: wait for it or pick another OUT") from e
    try:
        for d in [out, out / ".state", *(out / f for f in formats)]:
            d.mkdir(exist_ok=True)
            for stale in d.glob("*.tmp"):
                stale.unlink()
    except OSError as e:
        lock.close()
        raise DataError(f"OUT {out} is not writable ({e.strerror or e}): pick another OUT or fix it") from e
    return lock


def _run_split(job: SplitJob, out: Path, opts: dict, pool, workers: int, bar, src: str) -> None:
    """Process the samples this split still needs, in plan order, and write its unfinished files."""
    beton = None
    if job.need_ffcv:
        from pipeline.data.convert import beton as shard_ffcv

        beton = shard_ffcv.BetonWriter(str(out / "ffcv" / f"{job.split}.beton.tmp"), opts["ffcv"],
                                       capacity=len(job.order))
    tasks = [
        (shard, lo, min(lo + CHUNK, len(shard.entries)), shard.name in job.todo_wds)
        for shard in job.shards
        if job.need_ffcv or shard.name in job.todo_wds
        for lo in range(0, len(shard.entries), CHUNK)
    ]
    tar, rejected, converted = None, [], []  # the last two: of the shard being written
    ffcv_rejected = []
    try:
        for (shard, lo, hi, want_wds), results in _in_order(pool, tasks, 4 * workers, job.need_ffcv, opts):
            if want_wds and tar is None:
                tar, rejected, converted = TarWriter(out / "wds" / shard.name), [], []
            for e, r in zip(shard.entries[lo:hi], results, strict=True):
                if isinstance(r, Rejected):
                    item = {"path": _display(e.path, src), "reason": r.reason}
                    ffcv_rejected.append(item)
                    if want_wds:
                        rejected.append(item)
                    continue
                if want_wds:
                    tar.add(e.key, r.ext, r.wds, e.label)
                    if r.note:
                        converted.append({"path": _display(e.path, src), "reason": r.note})
                if beton is not None:
                    beton.add(r.ffcv, e.label)
            if bar is not None:
                bar.update(hi - lo)
            if want_wds and hi == len(shard.entries):
                tar.commit()
                job.records[shard.name] = _record(out, shard.name, shard.plan, tar.num_samples, tar.bytes,
                                                  tar.sha.hexdigest(), rejected, converted)
                tar = None
        if beton is not None:
            beton.close()
            path = out / "ffcv" / f"{job.split}.beton"
            os.replace(beton.path, path)
            fsync_dir(path.parent)
            job.records[path.name] = _record(out, path.name, job.ffcv_plan, beton.count, path.stat().st_size,
                                             sha256_file(path), ffcv_rejected, [])
            beton = None
    finally:
        if tar is not None:
            tar.abort()
        if beton is not None:
            beton.abort()


def _in_order(pool, tasks, depth: int, want_ffcv: bool, opts: dict):
    """Yield (task, results) in task order, keeping at most `depth` tasks in flight."""
    window: deque = deque()
    try:
        for task in tasks:
            shard, lo, hi, want_wds = task
            window.append((task, pool.submit(process_chunk, shard.entries[lo:hi], want_wds, want_ffcv, opts)))
            if len(window) >= depth:
                task, future = window.popleft()
                yield task, future.result()
        while window:
            task, future = window.popleft()
            yield task, future.result()
    finally:
        for _, future in window:
            future.cancel()


def _record(out: Path, name: str, plan: str, num_samples: int, size: int, sha256: str, rejected: list,
            converted: list) -> dict:
    record = {"plan": plan, "num_samples": num_samples, "bytes": size, "sha256": sha256,
              "rejected": rejected, "converted": converted}
    write_json(out / ".state" / f"{name}.json", record)
    return record


def _manifest(inputs: ImageNetInput, jobs: list[SplitJob], formats, opts: dict, allow_bad: int) -> dict:
    splits = {}
    for job in jobs:
        entry: dict = {"files_found": len(job.order)}
        if "wds" in formats:
            shards, first = [], 0
            for s in job.shards:
                r = job.records[s.name]
                shards.append({"name": s.name, "num_samples": r["num_samples"], "bytes": r["bytes"],
                               "sha256": r["sha256"], "first_index": first})
                first += r["num_samples"]
            entry["wds"] = {"shards": shards, "num_samples": first, "bytes": sum(s["bytes"] for s in shards)}
            entry["rejected"] = [x for s in job.shards for x in job.records[s.name]["rejected"]]
            entry["converted"] = [x for s in job.shards for x in job.records[s.name]["converted"]]
        if "ffcv" in formats:
            name = f"{job.split}.beton"
            r = job.records[name]
            entry["ffcv"] = {"name": name, "num_samples": r["num_samples"], "bytes": r["bytes"],
                             "sha256": r["sha256"]}
            entry.setdefault("rejected", r["rejected"])
            entry.setdefault("converted", [])
        entry["rejected"] = sorted(entry["rejected"], key=lambda r: r["path"])
        entry["converted"] = sorted(entry["converted"], key=lambda r: r["path"])
        entry["num_samples"] = len(job.order) - len(entry["rejected"])
        for fmt in formats:
            got = entry[fmt]["num_samples"]
            if got != entry["num_samples"]:
                raise RuntimeError(f"{job.split}: {fmt} holds {got} samples, expected {entry['num_samples']}")
        splits[job.split] = entry
    options = {"formats": list(formats), "seed": opts["seed"], "shard_bytes": opts["shard_bytes"],
               "max_side": opts["max_side"], "quality": opts["quality"], "classes": len(inputs.classes),
               "allow_bad": allow_bad, **{f"ffcv_{k}": v for k, v in opts["ffcv"].items()}}
    return manifest.build(inputs.classes, options, inputs.describe(), splits)


def _remove_stale(out: Path, jobs: list[SplitJob], formats) -> None:
    """Delete shard files and records of earlier runs that the current plan does not produce."""
    keep = {name for j in jobs for name in j.records}
    for d, pattern in (("wds", "*-*.tar"), ("ffcv", "*.beton")):
        if d in formats:
            for p in (out / d).glob(pattern):
                if p.name not in keep:
                    p.unlink()
    for p in (out / ".state").glob("*.json"):
        if p.name[: -len(".json")] not in keep:
            p.unlink()


def _summary(contents: dict, processed: int, elapsed: float, log) -> None:
    rate = processed / elapsed if elapsed > 0 else 0.0
    log(f"shards: processed {processed} images in {elapsed:.1f} s ({rate:.0f} images/s)")
    for split, s in contents["splits"].items():
        parts = [f"{s['num_samples']} written", f"{len(s['rejected'])} rejected", f"{s['files_found']} found"]
        if "wds" in s:
            parts.append(f"wds {len(s['wds']['shards'])} shards {s['wds']['bytes'] / 1e6:.1f} MB")
        if "ffcv" in s:
            parts.append(f"ffcv {s['ffcv']['bytes'] / 1e6:.1f} MB")
        log(f"  {split}: " + ", ".join(parts))
        for r in s["rejected"][:20]:
            log(f"    rejected {r['path']}: {r['reason']}")
        if len(s["rejected"]) > 20:
            log(f"    ... and {len(s['rejected']) - 20} more (see the manifest)")
        for r in s["converted"][:5]:
            log(f"    converted {r['path']}: {r['reason']}")


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="ImageNet copy: folders, original archives or flat val")
    parser.add_argument("--out", default="shards/imagenet1k", help="output folder (default: %(default)s)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                        help="formats to write (default: both)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (default: %(default)s)")
    parser.add_argument("--shard-bytes", type=float, default=1e9,
                        help="approximate WebDataset shard size in bytes (default: %(default).0f)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="WebDataset: re-encode images whose longer side exceeds this (default: none)")
    parser.add_argument("--quality", type=int, default=None,
                        help=f"WebDataset: JPEG quality of re-encoded images; given alone, re-encode every "
                             f"image (default: {REENCODE_QUALITY} when --max-side is given)")
    parser.add_argument("--classes", type=int, default=1000,
                        help="number of classes SRC must have; set it for subsets (default: %(default)s)")
    parser.add_argument("--allow-bad", type=int, default=0,
                        help="accept up to N undecodable input files (default: %(default)s)")
    d = FFCV_DEFAULTS
    parser.add_argument("--ffcv-write-mode", default=d["write_mode"], choices=WRITE_MODES,
                        help="FFCV RGBImageField write mode (default: %(default)s)")
    parser.add_argument("--ffcv-max-resolution", type=int, default=d["max_resolution"],
                        help="FFCV: longer side limit, 0 for none (default: %(default)s)")
    parser.add_argument("--ffcv-jpeg-quality", type=int, default=d["jpeg_quality"],
                        help="FFCV JPEG quality (default: %(default)s)")
    parser.add_argument("--ffcv-compress-probability", type=float, default=d["compress_probability"],
                        help="FFCV: share stored as JPEG in write mode proportion (default: %(default)s)")
    parser.add_argument("--ffcv-page-size", type=int, default=d["page_size"],
                        help="FFCV page size in bytes, a power of two (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    ffcv = {"write_mode": args.ffcv_write_mode, "max_resolution": args.ffcv_max_resolution or None,
            "jpeg_quality": args.ffcv_jpeg_quality, "compress_probability": args.ffcv_compress_probability,
            "page_size": args.ffcv_page_size}
    try:
        write_shards(args.src, args.out, formats=args.formats, workers=args.workers, seed=args.seed,
                     shard_bytes=int(args.shard_bytes), max_side=args.max_side, quality=args.quality,
                     ffcv=ffcv, classes=args.classes, allow_bad=args.allow_bad, progress=not args.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"shards: wrote {manifest.path(args.out)}")
    return 0
