"""CPU benchmark of the training engine's own costs, side by side with the real training step of RMT-T
(`Trainer.train_step`, bench/real_step.py): per-step overhead (EMA update, the stop/non-finite agreement
all_reduce, the per-step reseed, a metrics line) and checkpoint save/load time per GB (DeepSpeed ZeRO-2
files + EMA + per-rank state).

    make bench-engine                    # writes the "## Training engine" section of BENCHMARKS.md
    python bench/bench_engine.py         # print only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.train.config import config_from_dict  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = p.parse_args()

    from bench.real_step import SyntheticLoader, build_trainer
    from pipeline.train import checkpoint as ckpt
    from pipeline.train import distributed
    from pipeline.train.build import build_model
    from pipeline.train.loop import step_seed
    from pipeline.train.metrics import MetricsWriter

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    device = torch.device("cpu")
    env = distributed.DistEnv(0, 1, 0, "127.0.0.1", int(os.environ.get("MASTER_PORT", 29544)), "single")
    distributed.init(env, device, 600)
    cfg = config_from_dict({"model": {"name": "rmt_t", "num_classes": 1000},
                            "train": {"global_batch": args.batch, "max_batch_per_device": args.batch,
                                      "precision": "bf16", "device": "cpu"},
                            "checkpoint": {"keep": 1}, "deepspeed": {"zero_stage": 2}})
    torch.manual_seed(0)
    loader = SyntheticLoader((torch.randn(args.batch, 3, args.img, args.img),
                              torch.randint(0, 1000, (args.batch,))))
    trainer = build_trainer(cfg, build_model(cfg), loader, device, ema_decay=0.9999)
    engine, ema, batches = trainer.engine, trainer.ema, iter(loader)
    n_params = sum(p.numel() for p in engine.module.parameters())
    step_s = timed(lambda: trainer.train_step(next(batches)), args.steps)
    ema_s = timed(ema.update, 20)
    loss = torch.tensor(6.9)
    agree_s = timed(lambda: trainer._agree(loss), 50)  # the trainer's own stop/non-finite all_reduce
    reseed_s = timed(lambda: torch.manual_seed(step_seed(0, 123, 4, 1)), 200)
    tmp = trainer.output_dir
    writer = MetricsWriter(tmp, 0, tensorboard=True, progress="lines", total_steps=0, start_step=0)
    record = {"kind": "train", "step": 1, "epoch": 0, "loss": 6.9, "lr": 1e-3, "grad_norm": 1.0,
              "images_per_s": 100.0, "images_per_s_per_device": 100.0, "step_time_s": 0.1,
              "data_wait_frac": 0.01, "mfu": 0.3, "max_mem_gb": 1.0}
    sys_stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
    try:
        log_s = timed(lambda: writer.write(dict(record)), 50)
    finally:
        sys.stdout.close()
        sys.stdout = sys_stdout
    writer.close()

    ckpt_dir = trainer.ckpt_dir
    save_times, load_times, size = [], [], 0
    for _ in range(3):
        t = time.perf_counter()
        tag = trainer.save()
        save_times.append(time.perf_counter() - t)
        size = du(ckpt_dir / tag)
        t = time.perf_counter()
        ckpt.restore(engine, ckpt_dir, ckpt.Resume(tag, ckpt.read_meta(ckpt_dir / tag), tag), trainer)
        load_times.append(time.perf_counter() - t)
        trainer.step += 1  # the next save is a new tag
    shutil.rmtree(tmp, ignore_errors=True)
    save_s, load_s = sorted(save_times)[1], sorted(load_times)[1]
    gb = size / 2**30

    res = {
        "model": "rmt_t", "params": n_params, "img": args.img, "batch": args.batch,
        "train_step_ms": 1000 * step_s, "ema_update_ms": 1000 * ema_s, "agree_allreduce_ms": 1000 * agree_s,
        "reseed_us": 1e6 * reseed_s, "metrics_line_ms": 1000 * log_s,
        "per_step_overhead_frac": (ema_s + agree_s + reseed_s) / step_s,
        "checkpoint_gb": gb, "save_s": save_s, "load_s": load_s, "save_s_per_gb": save_s / gb,
        "load_s_per_gb": load_s / gb, "threads": torch.get_num_threads(),
    }
    print(json.dumps(res))
    table = "\n".join([
        "## Training engine",
        "",
        f"`make bench-engine` (bench/bench_engine.py), CPU, {res['threads']} threads, one process (gloo), "
        f"RMT-T ({n_params / 1e6:.1f}M params), {args.img} px, batch {args.batch}, bf16 autocast, ZeRO-2. "
        "Every number is from the same run; the machine is shared, so absolute times are noisy, ratios "
        "less so.",
        "",
        "| what | time | vs one training step |",
        "|---|---|---|",
        f"| training step (Trainer.train_step: fwd+bwd+ZeRO step, EMA, agreement) | {1000 * step_s:.0f} ms "
        "| 1 |",
        f"| EMA update (fp32, whole model; ZeRO-3: 1/world of it per rank) | {1000 * ema_s:.1f} ms "
        f"| {ema_s / step_s:.2%} |",
        f"| stop/non-finite agreement (one 2-float all_reduce) | {1000 * agree_s:.2f} ms | "
        f"{agree_s / step_s:.2%} |",
        f"| per-step reseed of torch's RNG | {1e6 * reseed_s:.0f} us | {reseed_s / step_s:.3%} |",
        f"| one metrics line (JSONL + TensorBoard), every metrics.log_every steps | {1000 * log_s:.2f} ms | "
        f"{log_s / step_s:.2%} |",
        f"| checkpoint save ({gb:.2f} GB: module, ZeRO fp32 + Adam states, EMA) | {save_s:.2f} s | "
        f"{save_s / gb:.1f} s/GB |",
        f"| checkpoint load | {load_s:.2f} s | {load_s / gb:.1f} s/GB |",
        "",
    ])
    print(table)
    if args.write:
        from bench.sections import write_section

        write_section(ROOT / "BENCHMARKS.md", table)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
