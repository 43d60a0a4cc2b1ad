"""Benchmark of `make shards` on fake ImageNet: images/s and MB/s per mode and worker count.

All runs happen side by side in one process on the same input (realistic sides, 200-500 px, a few
larger). Baselines, in one process: reading every input file; reading + a full decode (PIL verify +
load, what re-encode and FFCV modes do); reading + copy mode's check (a 1/8-scale JPEG decode). Copy
mode with 1 worker against that last baseline is the cost of everything around the check; ideally
it is close to 1. Results replace the "## Shards" section of BENCHMARKS.md (--markdown) and, with
--json PATH, are written there as JSON (what `make bench` reads).

    make bench-shards            # or: python bench/bench_shards.py --classes 10 --per-class 40
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sections import write_section  # noqa: E402
from pipeline.data.convert import encode, fake, shards  # noqa: E402
from pipeline.data.convert import imagenet as sources  # noqa: E402

SECTION = "## Shards"


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--markdown", default="BENCHMARKS.md",
                        help="write the section here (default: %(default)s; '' for none)")
    parser.add_argument("--json", help="also write the results here as JSON")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        fk = fake.write(tmp / "fake", layouts=("folders",), num_classes=args.classes,
                        train_per_class=args.per_class, val_per_class=max(1, args.per_class // 8))
        src = fk.root / "folders"
        entries = [e for split in sources.detect(src, args.classes).splits.values() for e in split]
        n = len(entries)
        mb = sum(e.size for e in entries) / 1e6

        def read():
            for e in entries:
                sources.read_input(e)

        def decode(full: bool):
            for e in entries:
                encode.decode(sources.read_input(e), full)

        rows = [("read input files only", 1, _time(read)),
                ("read + full decode (PIL verify + load)", 1, _time(lambda: decode(True))),
                ("read + copy mode's check (1/8-scale JPEG decode)", 1, _time(lambda: decode(False)))]
        runs = [("copy (wds, original bytes)", {"formats": ("wds",)}),
                ("re-encode (wds, --max-side 256 --quality 90)", {"formats": ("wds",), "max_side": 256,
                                                                  "quality": 90}),
                ("ffcv (jpg, max_resolution 512, quality 90)", {"formats": ("ffcv",)})]
        import ffcv.fields  # noqa: F401 (import time is not shard time)

        for name, kw in runs:
            for workers in (1, 2):
                out = tmp / f"out_{len(rows)}"
                seconds = _time(lambda kw=kw, out=out, workers=workers: shards.write_shards(
                    str(src), out, workers=workers, classes=args.classes, progress=False,
                    log=lambda *_: None, **kw))
                rows.append((name, workers, seconds))
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    check_rate = n / rows[2][2]
    lines = [SECTION, "",
             f"`make bench-shards` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, shared and busy): "
             f"{n} fake ImageNet images ({mb:.1f} MB JPEG, sides 200-500 px, a few up to 1000), "
             "train + val, all in one run. Rates count input images and input MB.", "",
             "| run | workers | images/s | MB/s | vs. copy mode's check in 1 process |",
             "|---|---|---|---|---|"]
    results = [{"run": name, "workers": workers, "images_per_s": n / seconds, "mb_per_s": mb / seconds,
                "vs_check": n / seconds / check_rate} for name, workers, seconds in rows]
    for r in results:
        lines.append(f"| {r['run']} | {r['workers']} | {r['images_per_s']:.0f} | {r['mb_per_s']:.1f} | "
                     f"{r['vs_check']:.2f}x |")
    lines += ["", "Every mode decodes every input image in a worker, since corrupt files must be caught. "
              "Copy mode decodes JPEGs at 1/8 scale (all compressed data is still decoded); its 1-worker "
              "row against the same check done in a bare loop shows what the pipeline around it costs "
              "(reading, checking, tar writing, sha256, fsync, worker start-up); the read-only row shows "
              "that reading is not the limit on this machine (page cache). "
              f"Load average at the end of the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
              "above the CPU count, 2 workers + the writer process cannot beat 1 worker, so worker "
              "scaling is not measurable here.", ""]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        write_section(Path(args.markdown), text)
    if args.json:
        Path(args.json).write_text(json.dumps({"images": n, "mb": mb, "baseline": rows[2][0],
                                               "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
