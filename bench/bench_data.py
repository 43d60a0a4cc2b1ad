"""Data-loading benchmark: images/s per CPU core of the train and val pipelines, baseline vs ours.

Baseline (the official RMT code's loader): torchvision ImageFolder over the extracted JPEGs +
timm `create_transform` (RandomResizedCrop 224 bicubic, flip, rand-m9-mstd0.5-inc1, normalise,
RandomErasing 0.25 pixel) + torch DataLoader, up to the float batch it yields.
Ours: `build_train_loader` batch makers (WebDataset, FFCV) up to the uint8 batch the workers hand over
(the device stage -- normalise, erasing, Mixup -- runs on the GPU in training; its CPU cost here is
reported separately). `wds-device` / `ffcv-device` (data.decode=device): the same batch makers up to
the encoded batch + drawn parameters the workers hand over; decoding and augmenting it is GPU work in
training (nvJPEG, batched tensor ops), unmeasured here without a GPU; the same code on this CPU is
reported for reference. Same images, same machine, one run, 0 (in the main process: no worker start-up
or transfer, the steady-state cost), 1 and 2 loader workers.

Token labeling: the same train pipelines over shards written with label maps (`make shards LABELS=`,
one synthetic TokenLabeling-sized map per image), each batch carrying its maps and sampling matrices
(`label_targets.LabelTargets`), against the same pipelines over the plain shards; the dense targets are
built on the training device, so they are not in these numbers.

"Per core" = images / CPU seconds used by the main process and its loader workers (user + system,
from getrusage), so other load on the machine does not inflate it; wall-clock images/s is shown too.
Usage: python bench/bench_data.py [--train-per-class 64] [--repeat 2] [--markdown BENCHMARKS.md]
       [--json PATH]  (`make bench` reads the JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import PIL
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sections import write_section  # noqa: E402
from pipeline.data.convert import fake, shards  # noqa: E402
from pipeline.data.convert.imagenet import detect  # noqa: E402
from pipeline.data.load.config import DataConfig  # noqa: E402
from pipeline.data.load.loader import TrainLoader, ValLoader, _stream  # noqa: E402

SECTION = "## Data loading"
TL_HEADING = "### Token labeling: label maps in the batch"
RECIPE = "rand-m9-mstd0.5-inc1"


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(make_iter, count_of, repeat: int) -> tuple[float, float, int]:
    """(images per wall second, images per CPU second, images): the best of `repeat` full passes
    (other jobs on the machine only ever slow a pass down)."""
    it = make_iter()  # warm-up batch (worker start, FFCV compile, page cache)
    next(iter(it))
    del it
    best_wall = best_cpu = 0.0
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), cpu_seconds()
        n = sum(count_of(item) for item in make_iter())
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        best_wall, best_cpu = max(best_wall, n / wall), max(best_cpu, n / cpu)
    return best_wall, best_cpu, n


def baseline(src: str, split: str, workers: int, batch: int, rand_augment: str):
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    if split == "train":
        tf = create_transform(224, is_training=True, auto_augment=rand_augment or None, color_jitter=None,
                              interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)
    else:
        tf = create_transform(224, is_training=False, interpolation="bicubic", crop_pct=0.875)
    ds = ImageFolder(os.path.join(src, split), transform=tf)

    def make():
        return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=split == "train",
                                           num_workers=workers, drop_last=split == "train")

    return make, lambda item: len(item[1])


def ours(root: str, fmt: str, split: str, workers: int, batch: int, rand_augment: str, decode: str,
         label_maps: bool = False):
    cfg = DataConfig(root=root, format=fmt, batch_size=batch, workers=workers, rand_augment=rand_augment,
                     color_jitter=0.0, decode=decode).validate()
    cpu = torch.device("cpu")
    if split == "train":
        loader = TrainLoader(cfg, 0, 1, cpu, label_maps)

        def make():
            loader.samples_seen = 0
            plan = loader.plan()
            return _stream(loader.format_batches, plan, plan.num_batches, cfg, cpu)
    else:
        loader = ValLoader(cfg, 0, 1, cpu)

        def make():
            return _stream(loader.format_batches, loader.batch_indices, len(loader.batch_indices), cfg,
                           cpu)

    return make, lambda item: len(item[2])


def marginal(root: str, fmt: str, decode: str, batch: int) -> float:
    """Train images per CPU-second through 1 loader worker beyond a pass's first batch: (images of a
    whole pass - of a 1-batch pass) / (CPU time of both likewise), the steady-state cost without the
    per-pass worker start-up that a short benchmark pass is dominated by. (A worker's CPU time is
    counted when it exits, so only whole passes can be timed.)"""
    cfg = DataConfig(root=root, format=fmt, batch_size=batch, workers=1, color_jitter=0.0,
                     decode=decode).validate()
    loader = TrainLoader(cfg, 0, 1, torch.device("cpu"))
    plan = loader.plan()
    cost = {}
    for num in (1, plan.num_batches) * 2:  # the cheaper of 2 tries each
        start = cpu_seconds()
        n = sum(len(item[2]) for item in _stream(loader.format_batches, plan, num, loader.cfg, loader.device))
        cost[n] = min(cost.get(n, float("inf")), cpu_seconds() - start)
    (n1, c1), (n2, c2) = sorted(cost.items())
    return (n2 - n1) / (c2 - c1)


def device_decode(root: str, batch: int, device: torch.device) -> float:
    """Images/s of data.decode=device's decode + crop/resize + flip + RandAugment (the GPU's work in
    training) on `device` in the main process (best of 2 passes over up to 4 batches; the first call
    warms up nvJPEG / the kernels)."""
    cfg = DataConfig(root=root, format="wds", batch_size=batch, workers=0, decode="device").validate()
    loader = TrainLoader(cfg, 0, 1, device)
    plan = loader.plan()
    items = list(_stream(loader.format_batches, plan, min(plan.num_batches, 4), loader.cfg, loader.device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loader.decoder.train(*items[0][1:3])
    best = 0.0
    for _ in range(2):
        sync()
        start = time.perf_counter()
        for _, encoded, labels, _ in items:
            loader.decoder.train(encoded, labels)
        sync()
        best = max(best, sum(len(item[2]) for item in items) / (time.perf_counter() - start))
    return best


def write_label_maps(out: Path, keys, num_classes: int, side: int) -> Path:
    """A synthetic map per train key: fp16 [2, 5, side, side] (top-5 scores, their classes), TokenLabeling's
    layout and size (NFNet-F6 at 576 px, stride 32: 18 x 18)."""
    from pipeline.data import label_maps

    g = torch.Generator().manual_seed(0)
    for key in keys:
        scores = torch.randn(label_maps.TOP_K, side, side, generator=g).sort(dim=0, descending=True).values
        indices = torch.randint(0, num_classes, (label_maps.TOP_K, side, side), generator=g)
        path = label_maps.map_path(out, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.stack([scores, indices.float()]).half(), path)
    return out


def paired(pipelines: dict, repeat: int) -> dict:
    """Best images per CPU-second of each of `pipelines` (name -> (make_iter, count_of)) over `repeat`
    passes each, the pipelines' passes alternating, so that load on the machine hits them alike."""
    for make, _ in pipelines.values():
        next(iter(make()))  # warm-up
    best = dict.fromkeys(pipelines, 0.0)
    for _ in range(repeat):
        for name, (make, count_of) in pipelines.items():
            cpu = cpu_seconds()
            n = sum(count_of(item) for item in make())
            best[name] = max(best[name], n / (cpu_seconds() - cpu))
    return best


def token_label_rows(root: str, root_tl: str, batch: int, repeat: int) -> list[dict]:
    """Train with RandAugment: images per core with label maps vs without, per pipeline, through 0
    loader workers (the steady state in the main process) and 1 (whole passes, the worker's start-up
    alike on both sides), each the best of `repeat` passes alternating between the two sides; and
    what the maps add per image in CPU microseconds."""
    rows = []
    for name in ("wds", "ffcv", "wds-device", "ffcv-device"):
        fmt, _, decode = name.partition("-")
        for workers in (0, 1):
            per_core = paired({maps: ours(where, fmt, "train", workers, batch, RECIPE, decode or "cpu", maps)
                               for maps, where in ((False, root), (True, root_tl))}, repeat)
            plain, with_maps = per_core[False], per_core[True]
            rows.append({"pipeline": name, "workers": workers, "plain_per_core": plain,
                         "maps_per_core": with_maps, "cost": 1 - with_maps / plain,
                         "maps_us_per_image": 1e6 * (1 / with_maps - 1 / plain)})
            print(f"token labeling {name:11s} workers={workers} {plain:8.1f} -> {with_maps:8.1f} "
                  f"img/s per core ({100 * rows[-1]['cost']:+.1f}% cost)", flush=True)
    return rows


def device_stage(root: str, batch: int) -> float:
    """Images/s of the device stage (normalise, erasing, Mixup) on this CPU, for reference."""
    cfg = DataConfig(root=root, format="wds", batch_size=batch, workers=0).validate()
    loader = TrainLoader(cfg, 0, 1, torch.device("cpu"))
    images = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8)
    labels = torch.randint(0, loader.num_classes, (batch,))
    idx = torch.arange(batch).numpy()
    start = time.perf_counter()
    for i in range(5):
        loader.device_augment(images, labels, 0, idx, idx * 0, batch_key=i)
    return 5 * batch / (time.perf_counter() - start)


def token_label_lines(args, tl_rows: list[dict]) -> list[str]:
    """The "### Token labeling" subsection of the Data loading section."""
    row = {(r["pipeline"], r["workers"]): r for r in tl_rows}
    extra = {(fmt, w): row[(f"{fmt}-device", w)]["maps_us_per_image"]
             for fmt in ("wds", "ffcv") for w in (0, 1)}
    share = {k: us / (1e6 / row[k]["plain_per_core"]) for k, us in extra.items()}
    direct = [100 * r["cost"] for r in tl_rows if "device" not in r["pipeline"]]
    return [
        TL_HEADING, "",
        f"`make bench-data`, or only these rows: `python bench/bench_data.py --token-label-only` "
        f"({'a run of its own' if args.token_label_only else 'the same run'}: {args.classes} classes x "
        f"{args.train_per_class} train images, batch {args.batch}; load average at the end "
        f"{os.getloadavg()[0]:.1f}). Train with RandAugment over shards written with label maps (`make "
        "shards LABELS=`; one "
        f"synthetic fp16 [2, 5, {args.map_side}, {args.map_side}] map per image, TokenLabeling's "
        "size) vs the same pipeline over the plain shards: each batch also carries its maps (top-5 "
        "scores and classes) and each sample's sampling matrices for its crop, flip and geometric "
        "RandAugment ops; the dense targets are built from them on the training device (not counted "
        "here). Workers 0 = the steady state in the main process; 1 = whole passes through one loader "
        "worker (its start-up alike on both sides, the maps' transfer included); each the best of "
        f"{args.tl_repeat} passes alternating between the two sides. Cost = 1 - with maps / without, "
        "per core; extra = what the maps add per image (CPU microseconds).", "",
        "The maps' work is the same on both decode paths; on the device path's CPU side little else "
        "happens, so there it is measurable. Per image, and as a share of the CPU decode path's time "
        "per image in the same setting (aim: at most 15%): "
        + "; ".join(f"{fmt}, {w} workers: {extra[(fmt, w)]:.0f} us ({100 * share[(fmt, w)]:.1f}%)"
                    for fmt in ("wds", "ffcv") for w in (0, 1))
        + ". Measured "
        f"directly, the CPU path's rows differ by {min(direct):+.1f} to {max(direct):+.1f}% (negative: "
        "faster with maps): at that size, the pass-to-pass variation of this shared machine, not the "
        "maps, whose share the device path bounds.", "",
        "| pipeline | workers | images/s per core, no maps | with maps | cost | extra (us/image) |",
        "|---|---|---|---|---|---|",
        *(f"| {r['pipeline']} | {r['workers']} | {r['plain_per_core']:.1f} | {r['maps_per_core']:.1f} | "
          f"{100 * r['cost']:.1f}% | {r['maps_us_per_image']:.1f} |" for r in tl_rows), "",
    ]


def write_token_label_part(path: Path, lines: list[str]) -> None:
    """Replace only the token-labeling subsection of the Data loading section (--token-label-only), so the
    other numbers of that section (which README cites) stay those of their own run."""
    parts = path.read_text().split("\n## ") if path.exists() else []
    old = next((p for p in parts[1:] if p.split("\n", 1)[0].strip() == SECTION[3:]), None)
    if old is None:
        raise SystemExit(f"{path} has no '{SECTION}' section yet: run make bench-data first")
    rest = ("## " + old).split("\n" + TL_HEADING)[0].rstrip("\n")
    write_section(path, rest + "\n\n" + "\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--train-per-class", type=int, default=64)
    ap.add_argument("--val-per-class", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                    help="0: the batch maker in this process (no worker start-up or transfer)")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per row; the best counts")
    ap.add_argument("--map-side", type=int, default=18,
                    help="side of the synthetic label maps (default: %(default)s, NFNet-F6 at 576 px)")
    ap.add_argument("--tl-repeat", type=int, default=5,
                    help="token-labeling rows, 0 workers: alternating timed passes per pipeline, the best "
                         "counts (default: %(default)s)")
    ap.add_argument("--no-token-label", action="store_true", help="skip the token-labeling rows")
    ap.add_argument("--token-label-only", action="store_true",
                    help="only the token-labeling rows; rewrites only their subsection of the section")
    ap.add_argument("--markdown", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"),
                    help="write the section here (default: %(default)s; '' for none)")
    ap.add_argument("--json", help="also write the results here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        print("writing fake ImageNet (sides 300-500 px, 5% up to 1000 px) and its shards ...", flush=True)
        fake.write(Path(tmp) / "src", layouts=("folders",), num_classes=args.classes,
                   train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                   min_side=300, max_side=500, seed=0)
        src = str(Path(tmp) / "src" / "folders")
        root = str(Path(tmp) / "shards")
        manifest = shards.write_shards(src, root, classes=args.classes, progress=False,
                                       log=lambda *a, **k: None)
        ffcv_opts = {k: v for k, v in manifest["options"].items() if k.startswith("ffcv")}
        tl_rows = []
        if not args.no_token_label:
            keys = [e.key for e in detect(src, args.classes).splits["train"]]
            maps = write_label_maps(Path(tmp) / "maps", keys, args.classes, args.map_side)
            root_tl = str(Path(tmp) / "shards-tl")
            shards.write_shards(src, root_tl, classes=args.classes, progress=False, log=lambda *a, **k: None,
                                labels=str(maps))
            tl_rows = token_label_rows(root, root_tl, args.batch, args.tl_repeat)
        if args.token_label_only:
            lines = token_label_lines(args, tl_rows)
            if args.markdown:
                write_token_label_part(Path(args.markdown), lines)
            if args.json:
                Path(args.json).write_text(json.dumps({"token_label": tl_rows}, indent=2) + "\n")
            print("\n".join(lines))
            return 0

        rows = []
        groups = [("train", RECIPE), ("val", RECIPE), ("train", "")]
        for split, rand_augment in groups:
            ra = "yes" if rand_augment else "no"
            for workers in args.workers:
                results = {}
                for name in ("baseline", "wds", "ffcv", "wds-device", "ffcv-device"):
                    if name == "baseline":
                        pipeline = baseline(src, split, workers, args.batch, rand_augment)
                    else:
                        fmt, _, decode = name.partition("-")
                        pipeline = ours(root, fmt, split, workers, args.batch, rand_augment, decode or "cpu")
                    wall, per_cpu, n = measure(*pipeline, args.repeat)
                    results[name] = (wall, per_cpu)
                    print(f"{split:5s} RandAugment={ra:3s} workers={workers} {name:8s} {n:5d} images  "
                          f"{wall:7.1f} img/s  {per_cpu:7.1f} img/s per core", flush=True)
                base = results["baseline"][1]
                rows += [{"split": split, "rand_augment": ra if split == "train" else None,
                          "workers": workers, "pipeline": name, "images_per_s": wall,
                          "images_per_s_per_core": per_cpu, "per_core_vs_baseline": per_cpu / base,
                          "per_core_vs_cpu_path": (per_cpu / results[name.split("-")[0]][1]
                                                   if name.endswith("-device") else None)}
                         for name, (wall, per_cpu) in results.items()]
        dev = device_stage(root, args.batch)
        dev_decode = device_decode(root, args.batch, torch.device("cpu"))
        cuda = torch.cuda.is_available()
        gpu_decode = device_decode(root, args.batch, torch.device("cuda")) if cuda else None
        steady = {name: marginal(root, *name.split("-"), args.batch)
                  for name in ("wds-cpu", "wds-device", "ffcv-cpu", "ffcv-device")}

    cmd = "make bench-data"
    lines = [
        SECTION, "",
        f"`{cmd}` (bench/bench_data.py): fake ImageNet, {args.classes} classes, "
        f"{args.train_per_class} train / {args.val_per_class} val images per class, sides 300-500 px "
        f"(5% up to 1000 px), JPEG; batch {args.batch}; crop 224. Machine: {os.cpu_count()} CPUs "
        f"({platform.machine()}), Pillow {PIL.__version__}, torch {torch.__version__}; shared with other "
        f"jobs, so wall numbers are noisy and the per-core column (images per CPU-second of the main "
        f"process + loader workers) is the comparison; best of {args.repeat} passes per row; load average "
        f"at the end: {os.getloadavg()[0]:.1f}. FFCV file options: {ffcv_opts}.", "",
        "Baseline = ImageFolder + timm create_transform + DataLoader (float batch, erasing on CPU). "
        "wds/ffcv = our loaders up to the uint8 batch handed to the device (train entries include the 3 "
        "repeated-augmentation copies). Rows without RandAugment (train, both sides off; color jitter off "
        "everywhere) show what the per-sample PIL RandAugment costs. "
        f"The device stage (normalise + RandomErasing + Mixup/CutMix) runs on the GPU in training; on "
        f"this CPU it does {dev:.0f} images/s.", "",
        "`-device` rows = `data.decode: device`: the workers read the encoded bytes, parse the header and "
        "draw each sample's parameters; the main process's CPU time counted is receiving the batches. "
        "Decoding and augmenting the batch (nvJPEG, crop/resize, flip, RandAugment) is GPU time in "
        + ("training: unmeasured (no GPU here), like the host-side cost of launching it"
           if gpu_decode is None else
           f"training: on {torch.cuda.get_device_name()} {gpu_decode:.0f} images/s, "
           f"{1000 * 256 / gpu_decode:.1f} ms per batch of 256 (wall time, host side included)")
        + f"; the same code run on this CPU (1 thread, train, RandAugment) does {dev_decode:.0f} images/s. "
        f"A pass forks its workers afresh, which a pass of this size feels (an ImageNet epoch does not): "
        f"beyond a pass's first batch, 1 worker, train with RandAugment, the images per core are "
        + ", ".join(f"{k} {v:.0f}" for k, v in steady.items())
        + f" (device path {steady['wds-device'] / steady['wds-cpu']:.1f}x (wds) and "
        f"{steady['ffcv-device'] / steady['ffcv-cpu']:.1f}x (ffcv) cheaper per image).", "",
        "| split | RandAugment | workers | pipeline | images/s (wall) | images/s per core | "
        "per core vs baseline | per core vs the CPU path |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['split']} | {r['rand_augment'] or '-'} | {r['workers']} | {r['pipeline']} | "
          f"{r['images_per_s']:.1f} | {r['images_per_s_per_core']:.1f} | {r['per_core_vs_baseline']:.2f}x | "
          f"{'-' if r['per_core_vs_cpu_path'] is None else format(r['per_core_vs_cpu_path'], '.1f') + 'x'} |"
          for r in rows), "",
    ]
    if tl_rows:
        lines += token_label_lines(args, tl_rows)
    if args.markdown:
        write_section(Path(args.markdown), "\n".join(lines))
    if args.json:
        settings = {k: getattr(args, k) for k in ("classes", "train_per_class", "val_per_class", "batch",
                                                  "repeat")}
        Path(args.json).write_text(json.dumps({**settings, "ffcv_options": ffcv_opts, "rows": rows,
                                               "device_stage_images_per_s": dev,
                                               "device_decode_on_cpu_images_per_s": dev_decode,
                                               "device_decode_on_cuda_images_per_s": gpu_decode,
                                               "steady_state_images_per_s_per_core": steady,
                                               "token_label": tl_rows},
                                              indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
