"""GPU training-step benchmark: RMT-B and RMT-L at 224 px, bf16 (torch autocast), ZeRO-2, world size 1,
with and without activation checkpointing, synthetic input vs the real WebDataset loader.

    make bench-gpu                       # on one GPU; fits in ~8 minutes on an H200
    python bench/bench_gpu.py --smoke    # tiny RMT-T at 64 px on CPU: exercises every code path

Each step is the trainer's own `Trainer.train_step` (bench/real_step.py). Prints one JSON line per case
and a Markdown table (images/s, peak memory, MFU, step time).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.train.config import config_from_dict  # noqa: E402


def make_shards(root: Path, num_classes: int, per_class: int, side: int, workers: int) -> Path:
    """A fake ImageNet written as real shards (the loader-fed cases read these)."""
    from pipeline.data.convert import fake
    from pipeline.data.convert.shards import write_shards

    fake.write(root / "src", layouts=("folders",), num_classes=num_classes, train_per_class=per_class,
               val_per_class=1, min_side=side, max_side=int(side * 1.6), large_fraction=0.0, quirks=False)
    out = root / "shards"
    write_shards(str(root / "src" / "folders"), out, formats=("wds",), workers=workers, classes=num_classes,
                 progress=False, log=lambda *a, **k: None)
    return out


def run_case(name: str, model: str, img: int, batch: int, ckpt: bool, fed: bool, shards: Path | None,
             warmup: int, steps: int, device: torch.device, peak_tflops: float, workers: int,
             num_classes: int, kwargs: dict) -> dict:
    from bench.real_step import SyntheticLoader, build_trainer
    from pipeline.data.load.loader import build_train_loader
    from pipeline.models.info import forward_flops
    from pipeline.train.build import build_model

    cfg = config_from_dict({
        "model": {"name": model, "num_classes": num_classes, "drop_path": 0.1, "grad_checkpointing": ckpt,
                  "kwargs": kwargs},
        "data": {"root": str(shards or ""), "img_size": img, "workers": workers, "repeated_aug": 1},
        "train": {"global_batch": batch, "max_batch_per_device": batch, "precision": "bf16",
                  "device": device.type, "sync_bn": False},
        "deepspeed": {"zero_stage": 2},
    })
    torch.manual_seed(0)
    net = build_model(cfg)
    flops = forward_flops(net, (img, img))
    if fed:
        loader = build_train_loader(dataclasses.replace(cfg.data, batch_size=batch), 0, 1, device)
        batches = iter(_cycle(loader))
    else:
        loader = SyntheticLoader((torch.randn(batch, 3, img, img, device=device),
                                  torch.randint(0, num_classes, (batch,), device=device)))
        batches = iter(loader)
    trainer = build_trainer(cfg, net, loader, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wait = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0, wait = time.perf_counter(), 0.0
        tw = time.perf_counter()
        micro_batch = next(batches)
        wait += time.perf_counter() - tw
        result = trainer.train_step(micro_batch)
    _sync(device)
    elapsed = time.perf_counter() - t0
    ips = steps * batch / elapsed
    mem = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    res = {"case": name, "model": model, "img": img, "batch": batch, "grad_ckpt": ckpt,
           "input": "loader" if fed else "synthetic", "images_per_s": round(ips, 1),
           "step_ms": round(1000 * elapsed / steps, 1), "data_wait_frac": round(wait / elapsed, 3),
           "peak_mem_gb": mem, "mfu": round(3 * flops * ips / (peak_tflops * 1e12), 4),
           "loss": round(result.loss.item(), 3)}
    shutil.rmtree(trainer.output_dir, ignore_errors=True)
    del trainer, net, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _cycle(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of every case (correctness only)")
    p.add_argument("--batch", type=int, default=128, help="per-GPU batch (default 128)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device dense bf16 peak (H100/H200: 989)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="loader workers")
    p.add_argument("--out", help="also write the JSON lines here")
    args = p.parse_args()

    from pipeline.train import distributed

    env = distributed.DistEnv(0, 1, 0, "127.0.0.1", int(os.environ.get("MASTER_PORT", 29533)), "single")
    device = torch.device("cpu") if args.smoke else distributed.choose_device("cuda", 0)
    distributed.init(env, device, 600)
    if args.smoke:
        tiny = {"embed_dims": [16, 32, 64, 64], "depths": [1, 1, 1, 1], "num_heads": [2, 2, 4, 4],
                "projection": 64}
        models, img, batch, steps, warmup, classes = [("rmt_t", tiny)], 64, 4, 2, 1, 4
        data = dict(num_classes=4, per_class=4, side=72, workers=1)
    else:
        models, img, batch, steps, warmup, classes = [("rmt_b", {}), ("rmt_l", {})], 224, args.batch, \
            args.steps, args.warmup, 1000
        data = dict(num_classes=20, per_class=100, side=260, workers=args.workers)
    tmp = tempfile.TemporaryDirectory(prefix="bench_gpu_")
    t = time.perf_counter()
    shards = make_shards(Path(tmp.name), **data)
    print(f"fake shards: {time.perf_counter() - t:.1f}s", flush=True)
    cases = []
    for model, kwargs in models:
        for ckpt in (False, True):
            cases.append((f"{model} synthetic ckpt={ckpt}", model, ckpt, False, kwargs))
        cases.append((f"{model} loader", model, False, True, kwargs))
    results = []
    for name, model, ckpt, fed, kwargs in cases:
        t = time.perf_counter()
        res = run_case(name, model, img, batch, ckpt, fed, shards, warmup, steps, device, args.peak_tflops,
                       data["workers"] if fed else 0, data["num_classes"] if fed else classes, kwargs)
        res["case_s"] = round(time.perf_counter() - t, 1)
        results.append(res)
        print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    print("\n| case | images/s | step ms | peak GB | MFU | data wait |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['images_per_s']} | {r['step_ms']} | {r['peak_mem_gb']} | {r['mfu']:.1%} | "
              f"{r['data_wait_frac']:.0%} |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
