"""Benchmark of `make shards` on fake ImageNet: images/s and MB/s per mode and worker count.

All runs happen side by side in one process on the same input (realistic sides, 200-500 px, a few
larger), so the ratios hold even on a busy machine. Baselines: reading every input file, and
reading + decoding it (PIL verify + load, what every mode must do to catch corrupt files), in one
process. Copy mode should run near the decode baseline times the workers: bounded by reading and
decoding the input, not by the Python around it. Results replace the "## Shards" section of
BENCHMARKS.md.

    make bench-shards            # or: python bench/bench_shards.py --classes 10 --per-class 40
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.data import fake, shards, sources

SECTION = "## Shards"


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--output", default="BENCHMARKS.md")
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
                sources.read_entry(e)

        def decode():
            for e in entries:
                data = sources.read_entry(e)
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
                Image.open(io.BytesIO(data)).load()

        rows = [("read input files only", 1, _time(read)),
                ("read + decode (PIL verify + load)", 1, _time(decode))]
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

    decode_rate = n / rows[1][2]
    lines = [SECTION, "",
             f"`make bench-shards` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, shared and busy): "
             f"{n} fake ImageNet images ({mb:.1f} MB JPEG, sides 200-500 px, a few up to 1000), "
             "train + val, all in one run. Rates count input images and input MB.", "",
             "| run | workers | images/s | MB/s | vs. 1-process decode |", "|---|---|---|---|---|"]
    for name, workers, seconds in rows:
        lines.append(f"| {name} | {workers} | {n / seconds:.0f} | {mb / seconds:.1f} | "
                     f"{n / seconds / decode_rate:.2f}x |")
    lines += ["", "Every mode decodes every input image in the workers (corrupt files must be caught), so "
              "copy mode is bounded by decoding, and scales with workers; the main process only "
              "writes and hashes. Includes worker start-up, planning and fsyncs.", ""]
    text = "\n".join(lines)
    print(text)
    path = Path(args.output)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION in old:
        head, rest = old.split(SECTION, 1)
        following = rest.find("\n## ")  # the next section, kept as it is
        new = head + text + ("\n" + rest[following + 1:] if following >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


if __name__ == "__main__":
    main()
