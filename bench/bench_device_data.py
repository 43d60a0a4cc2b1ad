"""CPU cost per training image: today's CPU decode path vs the device path's CPU side, one JSON line.

Today: `WdsTrainSource.produce` (read, PIL decode + crop/resize, flip, RandAugment) in this process.
Device path, CPU side: read the bytes, parse the image header (size, format) and draw `TrainParams`
(`aug_params`); decode and augment then run on the GPU and are not measured here (GPU time).
CPU time is this process's user + system time (getrusage), one process, torch at 1 thread.
Usage: python bench/bench_device_data.py [--per-class 32] [--batch 64]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import manifest  # noqa: E402
from pipeline.data.convert import fake, shards  # noqa: E402
from pipeline.data.load.aug_params import ParamSource  # noqa: E402
from pipeline.data.load.config import DataConfig  # noqa: E402
from pipeline.data.load.wds import ShardSet, WdsTrainBatches  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def device_cpu_side(shard_set: ShardSet, params: ParamSource, indices: np.ndarray):
    datas, heights, widths = [], [], []
    for index in indices.tolist():
        data, _ = shard_set.read(index)
        width, height = Image.open(io.BytesIO(data)).size
        datas.append(data)
        heights.append(height)
        widths.append(width)
    return datas, params.draw(0, indices, np.zeros(len(indices), np.int64), heights, widths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-device-data-") as tmp:
        fake.write(Path(tmp) / "src", layouts=("folders",), num_classes=args.classes,
                   train_per_class=args.per_class, val_per_class=1, min_side=300, max_side=500, seed=0)
        root = str(Path(tmp) / "shards")
        shards.write_shards(str(Path(tmp) / "src" / "folders"), root, classes=args.classes, progress=False,
                            log=lambda *a, **k: None)
        cfg = DataConfig(root=root, batch_size=args.batch, color_jitter=0.0).validate()
        entry = manifest.read(root)["splits"]["train"]
        shard_set = ShardSet(root, "train", entry["wds"]["shards"])
        n = shard_set.num_samples // args.batch * args.batch
        batches = np.arange(n).reshape(-1, args.batch)
        today = WdsTrainBatches(shard_set, ParamSource(cfg), skip_bad=False)
        params = ParamSource(cfg)
        result = {"bench": "device_data", "images": int(n), "batch": args.batch}
        runs = (("cpu_path", lambda b: today.produce(0, b, np.zeros(len(b), np.int64))),
                ("device_path_cpu_side", lambda b: device_cpu_side(shard_set, params, b)))
        for name, run in runs:
            run(batches[0])  # warm-up (page cache, imports)
            start = cpu_seconds()
            for b in batches:
                run(b)
            result[f"{name}_images_per_cpu_s"] = round(n / (cpu_seconds() - start), 1)
        result["ratio"] = round(result["device_path_cpu_side_images_per_cpu_s"]
                                / result["cpu_path_images_per_cpu_s"], 2)
        result["device_side"] = "unmeasured (GPU time; no GPU here)"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
