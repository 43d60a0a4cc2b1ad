"""`make bench-model`: RMT training-step throughput and peak memory, our MaSA vs the straightforward one.

One step = forward + backward + AdamW step on random images. Speed: both implementations in this
process, steps interleaved, the fastest counts (load from other processes hits both alike). Memory:
each in a fresh subprocess (peak RSS above the RSS before the first step on CPU, the CUDA
allocator's peak on GPU), so it is its own. The "reference"
implementation is `tests/reference_rmt.py` (explicit softmax(QK^T + mask) V, masks rebuilt each call),
with the same weights. Also measured: the FLOP/s of one large bf16/fp32 matmul on the same device, so
the model's achieved FLOP/s can be read as a fraction of what the hardware does on dense matmuls.

    python -m bench.bench_model [--models rmt_t rmt_s] [--size 224] [--batch 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def matmul_flops_per_s(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(model_name: str, impl: str, device: str, checkpointing: bool, seed: int = 0):
    """The model (same weights for both implementations: same seed) and its AdamW optimizer."""
    import timm

    import pipeline.models  # noqa: F401
    from tests.reference_rmt import use_reference

    torch.manual_seed(seed)
    model = timm.create_model(model_name).to(device).train()
    if impl == "reference":
        use_reference(model)
    model.set_grad_checkpointing(checkpointing)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def make_step(model, opt, precision: str, size: int, batch: int, device: str):
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    return step


def time_pair(model_name: str, precision: str, size: int, batch: int, steps: int, device: str,
              checkpointing: bool) -> dict[str, float]:
    """Images/s of both implementations, steps interleaved (ref, ours, ref, ...) so that load from
    other processes hits both alike; the fastest step of each counts."""
    steppers = {}
    for impl in ("reference", "ours"):
        model, opt = build(model_name, impl, device, checkpointing)
        steppers[impl] = make_step(model, opt, precision, size, batch, device)
        steppers[impl]()  # warm-up: allocations, mask caches, optimizer state
    best = {impl: float("inf") for impl in steppers}
    for _ in range(steps):
        for impl, step in steppers.items():
            best[impl] = min(best[impl], step())
    return {impl: batch / t for impl, t in best.items()}


def peak_memory_gib(model_name: str, impl: str, precision: str, size: int, batch: int, device: str,
                    checkpointing: bool) -> float:
    """Peak memory of two training steps beyond what the process held before them (weights, inputs,
    the framework itself): on CPU the peak RSS of this (fresh) process, on CUDA the allocator's peak."""
    model, opt = build(model_name, impl, device, checkpointing)
    step = make_step(model, opt, precision, size, batch, device)
    if device.startswith("cuda"):
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _proc_status_bytes("VmRSS")
    step()
    step()
    if device.startswith("cuda"):
        return (torch.cuda.max_memory_allocated() - before) / 2**30
    return (_proc_status_bytes("VmHWM") - before) / 2**30


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status. VmHWM (peak RSS) belongs to this process image, unlike
    getrusage's ru_maxrss, which Linux carries over from the parent across fork + exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.bench_model", *args],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["rmt_t", "rmt_s"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpointing", action="store_true", help="also measure activation checkpointing")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--memory-child", nargs=4, metavar=("MODEL", "IMPL", "PRECISION", "CKPT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_child:
        model, impl, precision, ckpt = args.memory_child
        print(json.dumps(peak_memory_gib(model, impl, precision, args.size, args.batch, args.device,
                                         ckpt == "1")))
        return 0

    common = ["--size", str(args.size), "--batch", str(args.batch), "--device", args.device]
    peak = {prec: matmul_flops_per_s(args.device, torch.bfloat16 if prec == "bf16" else torch.float32)
            for prec in args.precisions}
    rows = []
    print(f"device {args.device}, {torch.get_num_threads()} threads, input {args.size}px, "
          f"batch {args.batch}, best of {args.steps} interleaved steps")
    print("large matmul: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peak.items()))
    print(f"{'model':<6} {'prec':<5} {'ckpt':<4} {'impl':<9} {'img/s':>7} {'mem GiB':>8} "
          f"{'TFLOP/s':>8} {'of mm':>6} {'speedup':>7} {'mem ratio':>9}")
    import timm

    from pipeline.models.info import forward_flops

    for model in args.models:
        flops = forward_flops(timm.create_model(model), (args.size, args.size))
        for precision in args.precisions:
            for ckpt in ([False, True] if args.checkpointing else [False]):
                speed = time_pair(model, precision, args.size, args.batch, args.steps, args.device, ckpt)
                pair = {}
                for impl in ("reference", "ours"):
                    mem = run_child(["--memory-child", model, impl, precision, "1" if ckpt else "0", *common])
                    tflops = 3 * flops * speed[impl] / 1e12
                    pair[impl] = dict(model=model, precision=precision, checkpointing=ckpt, impl=impl,
                                      images_per_s=speed[impl], peak_gib=mem, model_tflops_per_s=tflops,
                                      fraction_of_matmul=tflops * 1e12 / peak[precision])
                ours, ref = pair["ours"], pair["reference"]
                ours["speedup_vs_reference"] = ours["images_per_s"] / ref["images_per_s"]
                ours["memory_vs_reference"] = ours["peak_gib"] / ref["peak_gib"]
                for r in (ref, ours):
                    extra = (f"{r['speedup_vs_reference']:>6.2f}x {r['memory_vs_reference']:>8.2f}x"
                             if r is ours else "")
                    print(f"{model:<6} {precision:<5} {'yes' if ckpt else 'no':<4} {r['impl']:<9} "
                          f"{r['images_per_s']:>7.2f} {r['peak_gib']:>8.2f} {r['model_tflops_per_s']:>8.3f} "
                          f"{r['fraction_of_matmul']:>6.1%} {extra}", flush=True)
                    rows.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "size": args.size, "batch": args.batch,
                       "matmul_flops_per_s": peak, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
