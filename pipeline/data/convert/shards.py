"""The `shards` command: ImageNet into WebDataset shards and FFCV .beton files, resumable and exact.

Output (docs: README "Shards"; format fixed by the data contract):

    OUT/manifest.json   classes, options, source, per split: samples, rejected files, shards, checksums
    OUT/wds/<split>-NNNNNN.tar     <key>.jpg (or .png) + <key>.cls, in one seeded global permutation
    OUT/ffcv/<split>.beton         the same samples in the same order (index i = i-th wds sample)
    (with LABELS: each train sample's label map too, wds member <key>.tlm, .beton field `tlm`)
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
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import formats as registry
from pipeline.data import label_maps, manifest
from pipeline.data.convert.beton import FFCV_DEFAULTS, WRITE_MODES
from pipeline.data.convert.encode import Rejected, init_worker, process_chunk
from pipeline.data.convert.imagenet import ImageNetInput, InputFile, detect
from pipeline.data.convert.outputs import Output, finished, sha256_file, write_json  # noqa: F401 (sha256_file)
from pipeline.data.convert.tar import REENCODE_QUALITY
from pipeline.data.errors import DataError

FORMATS = tuple(registry.FORMATS)
SPLITS = ("train", "val")
CHUNK = 16  # samples per worker task
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- planning

def plan_split(split: str, entries: list[InputFile], opts: dict, formats) -> tuple[list[InputFile], dict]:
    """(entries in the seeded global permutation, format -> its output files for them)."""
    ordered = sorted(entries, key=lambda e: e.key)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.key == b.key:
            raise DataError(f"two {split} files have the key {a.key}: {a.path} and {b.path}; remove one")
    dotted = [e.path for e in ordered if "." in e.key]
    if dotted:
        raise DataError(f"{split} file names must have no '.' before the extension: {dotted[0]}; rename them")
    rng = np.random.default_rng([opts["seed"], SPLITS.index(split)])
    order = [ordered[i] for i in rng.permutation(len(ordered))]
    return order, {f: _writer(f).plan(split, order, opts) for f in formats}


def _writer(fmt: str):
    return registry.FORMATS[fmt].writer_module()


# ---------------------------------------------------------------- the run

@dataclass
class SplitJob:
    split: str
    order: list[InputFile]
    outputs: dict[str, list[Output]]  # format -> its output files
    records: dict[str, dict]  # finished file name -> record
    todo: set[str]  # names of the output files still to write

    def tasks(self) -> list[tuple[int, int, tuple[str, ...]]]:
        """(lo, hi, formats to encode) of every chunk still to process, in order; a chunk lies in one
        output file of each format."""
        cuts = sorted({o.lo for outs in self.outputs.values() for o in outs} | {len(self.order)})
        tasks = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            wanted = tuple(f for f, outs in self.outputs.items()
                           if any(o.lo <= a < o.hi and o.name in self.todo for o in outs))
            if wanted:
                tasks += [(lo, min(lo + CHUNK, b), wanted) for lo in range(a, b, CHUNK)]
        return tasks


def _display(path: str, src: str) -> str:
    return os.path.relpath(path, src) if path.startswith(src + os.sep) else path


def write_shards(src: str, out: str | os.PathLike, formats=FORMATS, workers: int | None = None,
                 seed: int = 0, shard_bytes: int = 10**9, max_side: int | None = None,
                 quality: int | None = None, ffcv: dict | None = None, classes: int = 1000,
                 allow_bad: int = 0, progress: bool = True, log=print, labels: str | None = None) -> dict:
    """Write shards of `src` into `out` (see module docstring); returns the manifest. `labels`: a folder
    of TokenLabeling label maps (`pipeline.data.label_maps`), stored with each train image."""
    try:
        return _write_shards(src, Path(out), formats, workers, seed, shard_bytes, max_side, quality, ffcv,
                             classes, allow_bad, progress, log, labels)
    except OSError as e:
        if e.errno in _DISK_ERRNOS:
            raise DataError(
                f"no space left writing into {out} ({e.strerror}): free space or pick another OUT, "
                "then re-run; finished files are kept"
            ) from e
        raise


def _write_shards(src, out: Path, formats, workers, seed, shard_bytes, max_side, quality, ffcv, classes,
                  allow_bad, progress, log, labels) -> dict:
    formats = [f for f in FORMATS if f in formats]
    if not formats:
        raise DataError(f"no output format chosen: FORMATS must name one or both of {' '.join(FORMATS)}")
    opts = {"seed": seed, "shard_bytes": int(shard_bytes), "max_side": max_side, "quality": quality,
            "ffcv": {**FFCV_DEFAULTS, **(ffcv or {})}, "classes": classes,
            "labels": {"train": os.path.abspath(labels)} if labels else {}}
    if labels and not os.path.isdir(labels):
        raise DataError(f"LABELS={labels} is not a folder: give TokenLabeling's label-map folder "
                        "(<wnid>/<key>.pt), or make one with python -m pipeline label-maps")
    for f in formats:
        _writer(f).check(opts)
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
        order, outputs = plan_split(split, inputs.splits[split], opts, formats)
        records = {o.name: r for f, outs in outputs.items() for o in outs
                   if (r := finished(out, f"{f}/{o.name}", o.plan)) is not None}
        todo = {o.name for outs in outputs.values() for o in outs if o.name not in records}
        jobs.append(SplitJob(split, order, outputs, records, todo))

    todo_samples = sum(hi - lo for j in jobs for lo, hi, _ in j.tasks())
    skipped = sum(len(j.records) for j in jobs)
    log(f"shards: {inputs.layout} layout at {inputs.path}: {len(inputs.classes)} classes, "
        + ", ".join(f"{len(j.order)} {j.split} files" for j in jobs)
        + f"; {skipped} output files already complete, {todo_samples} images to process"
        + f" with {workers} workers")
    if todo_samples:  # OUT is about to change: no manifest until it is complete again
        manifest.path(out).unlink(missing_ok=True)
    for f in formats:
        if todo_samples and hasattr(_writer(f), "preload"):
            _writer(f).preload()
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
        raise DataError(_rejected_text(rejected, out / "rejected.json"))
    (out / "rejected.json").unlink(missing_ok=True)
    write_json(manifest.path(out), contents)
    return contents


def _rejected_text(rejected: list[dict], listing: Path) -> str:
    """What was rejected and the fix: undecodable images and missing/damaged label maps named apart."""
    maps = sum(1 for r in rejected if r.get("label_map"))
    images = len(rejected) - maps
    what = ([f"{images} input files could not be decoded"] if images else []) \
        + ([f"{maps} label maps (LABELS) are missing or damaged"] if maps else [])
    fix = (["remove or replace the files"] if images else []) \
        + (["write those maps (python -m pipeline label-maps skips the good ones)"] if maps else [])
    return (f"{' and '.join(what)} (listed above and in {listing}); {' and '.join(fix)}, or accept them "
            f"with --allow-bad {len(rejected)} (finished files are kept)")


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
    open_files: dict[str, tuple] = {}  # format -> (output, writer, its rejected, its converted)
    try:
        for (lo, hi, wanted), results in _in_order(pool, job, 4 * workers, opts):
            for f in wanted:
                if f not in open_files:
                    o = next(o for o in job.outputs[f] if o.lo <= lo < o.hi)
                    open_files[f] = (o, _writer(f).open_output(out, o, opts), [], [])
            for e, r in zip(job.order[lo:hi], results, strict=True):
                for f in wanted:
                    _, writer, rejected, converted = open_files[f]
                    if isinstance(r, Rejected):
                        rejected.append({"path": _display(e.path, src), "reason": r.reason,
                                         **({"label_map": True} if r.label_map else {})})
                        continue
                    writer.put(e.key, e.label, r.payloads[f], r.label_map)
                    if r.notes[f]:
                        converted.append({"path": _display(e.path, src), "reason": r.notes[f]})
            if bar is not None:
                bar.update(hi - lo)
            for f in wanted:
                o, writer, rejected, converted = open_files[f]
                if hi == o.hi:
                    del open_files[f]
                    num, size, sha = writer.finish()
                    job.records[o.name] = _record(out, o.name, o.plan, num, size, sha, rejected, converted)
    finally:
        for _, writer, _, _ in open_files.values():
            writer.abort()


def _in_order(pool, job: SplitJob, depth: int, opts: dict):
    """Yield (task, results) in task order, keeping at most `depth` tasks in flight."""
    window: deque = deque()
    try:
        for task in job.tasks():
            lo, hi, wanted = task
            window.append((task, pool.submit(process_chunk, job.order[lo:hi], wanted, opts,
                                             opts["labels"].get(job.split))))
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
        for f in formats:
            entry[f] = _writer(f).section(job.outputs[f], job.records)
        first = [job.records[o.name] for o in job.outputs[formats[0]]]  # rejected/converted as it saw them
        entry["rejected"] = sorted((x for r in first for x in r["rejected"]), key=lambda r: r["path"])
        entry["converted"] = sorted((x for r in first for x in r["converted"]), key=lambda r: r["path"])
        entry["num_samples"] = len(job.order) - len(entry["rejected"])
        if job.split in opts["labels"]:
            entry["label_maps"] = {"member": label_maps.MEMBER, "encoding": label_maps.MAGIC.decode()}
        for fmt in formats:
            got = entry[fmt]["num_samples"]
            if got != entry["num_samples"]:
                raise RuntimeError(f"{job.split}: {fmt} holds {got} samples, expected {entry['num_samples']}")
        splits[job.split] = entry
    options = {"formats": list(formats), "seed": opts["seed"], "shard_bytes": opts["shard_bytes"],
               "max_side": opts["max_side"], "quality": opts["quality"], "classes": len(inputs.classes),
               "allow_bad": allow_bad, **{f"ffcv_{k}": v for k, v in opts["ffcv"].items()}}
    if opts["labels"]:
        options["labels"] = opts["labels"]["train"]
    return manifest.build(inputs.classes, options, inputs.describe(), splits)


def _remove_stale(out: Path, jobs: list[SplitJob], formats) -> None:
    """Delete shard files and records of earlier runs that the current plan does not produce."""
    keep = {name for j in jobs for name in j.records}
    for f in formats:
        w = _writer(f)
        for p in (out / w.NAME).glob(w.STALE_GLOB):
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
    parser.add_argument("--labels", default=None,
                        help="TokenLabeling label-map folder (<wnid>/<key>.pt): store each train image's map "
                             "(WebDataset member .tlm, .beton field tlm); a missing or bad map is rejected "
                             "like a bad image")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    ffcv = {"write_mode": args.ffcv_write_mode, "max_resolution": args.ffcv_max_resolution or None,
            "jpeg_quality": args.ffcv_jpeg_quality, "compress_probability": args.ffcv_compress_probability,
            "page_size": args.ffcv_page_size}
    write_shards(args.src, args.out, formats=args.formats, workers=args.workers, seed=args.seed,
                 shard_bytes=int(args.shard_bytes), max_side=args.max_side, quality=args.quality,
                 ffcv=ffcv, classes=args.classes, allow_bad=args.allow_bad, progress=not args.no_progress,
                 labels=args.labels)
    print(f"shards: wrote {manifest.path(args.out)}")
    return 0
