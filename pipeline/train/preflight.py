"""Pre-flight check of a job's ranks: host, device, matmul speed, all_reduce bandwidth, slow or lost hosts.

`python -m pipeline preflight` runs as every rank of the job (srun, torchrun: the same environment as
`pipeline train`). The ranks first check in at rank 0's TCP store with a short deadline, so a rank that
cannot reach the others ends the job at once with its host named instead of hanging at the first
collective of training. Then each rank times a small float32 matmul, one rank at a time (ranks that
share cores do not slow each other's measurement, so a slow host stands out), and all ranks time an
all_reduce together. Rank 0 prints one line per rank and names the hosts whose matmul speed is below
`--slow-fraction` of the median. Exit codes: 0 ok (slow hosts are a warning), 1 a rank is unreachable.
A few seconds in all. Rank 0 gives up waiting for check-ins after `--timeout-s`, the others after twice
that, so the report comes from rank 0, which names every missing rank (and its host when the launcher
exported RMT_NODE_HOSTS, the job's hosts in order, and srun placed the ranks in blocks of
SLURM_NTASKS_PER_NODE).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch

from pipeline.errors import PipelineError


class UnreachableError(PipelineError):
    """A rank cannot reach rank 0 (or rank 0 does not hear from it) within the check-in deadline; the
    message starts with `preflight:`, so the job's log says which step failed."""

    def __init__(self, message: str):
        super().__init__(f"preflight: {message}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="device to test (as train.device)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="seconds rank 0 waits for every rank to check in before the job fails")
    parser.add_argument("--matmul-size", type=int, default=256, help="side of the square matmul")
    parser.add_argument("--matmul-s", type=float, default=0.3, help="seconds each rank spends on matmuls")
    parser.add_argument("--allreduce-mb", type=float, default=4.0, help="size of the all_reduce tensor (MB)")
    parser.add_argument("--slow-fraction", type=float, default=0.5,
                        help="a rank below this fraction of the median matmul speed is named as slow")


def _local_address(master_addr: str, port: int) -> str:
    """The address this host uses to reach the master (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master_addr, port))
            return s.getsockname()[0]
        except OSError:
            return "?"


def _host_of_rank(world_size: int) -> dict[int, str]:
    """rank -> host for a SLURM step of equal blocks (srun's default placement), else {}."""
    hosts = [h for h in os.environ.get("RMT_NODE_HOSTS", "").split(",") if h]
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "")
    if not hosts or not per_node.isdigit() or int(per_node) * len(hosts) != world_size:
        return {}
    return {r: hosts[r // int(per_node)] for r in range(world_size)}


def _check_in(env, host: str, addr: str, timeout_s: float):
    """Every rank registers at rank 0's TCP store; returns the store. Raises naming who is missing."""
    from torch.distributed import TCPStore

    wait_s = timeout_s if env.rank == 0 else 2 * timeout_s  # rank 0 reports first: it sees who is missing
    try:
        store = TCPStore(env.master_addr, env.master_port, env.world_size, env.rank == 0,
                         timeout=datetime.timedelta(seconds=wait_s), wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        raise UnreachableError(f"rank {env.rank} on host {host} ({addr}) cannot reach rank 0 at "
                               f"{env.master_addr}:{env.master_port} within {wait_s:g}s "
                               f"({str(e).splitlines()[0][:120]}): check this host's network") from None
    store.set(f"preflight/{env.rank}", f"{host} {addr}")
    if env.rank == 0:
        keys = [f"preflight/{r}" for r in range(env.world_size)]
        deadline = time.monotonic() + timeout_s
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.05)
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        if missing:
            seen = sorted({store.get(k).decode().split()[0] for k in keys if store.check([k])})
            hosts = _host_of_rank(env.world_size)
            where = f" (on {', '.join(sorted({hosts[r] for r in missing}))})" if hosts else ""
            raise UnreachableError(f"ranks {missing}{where} did not check in at rank 0 ({env.master_addr}:"
                                   f"{env.master_port}) within {timeout_s:g}s (hosts that did: "
                                   f"{', '.join(seen)}): check the network of the host(s) named")
    return store


def _matmul_gflops(device: torch.device, n: int, seconds: float) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e9


def _allreduce_mb_s(device: torch.device, mb: float, iters: int = 3) -> float:
    import torch.distributed as dist

    x = torch.ones(int(mb * 2**20 / 4), device=device)
    dist.all_reduce(x)  # warm-up (connections)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return mb * iters / (time.perf_counter() - t0)


def report(rows: list[dict], slow_fraction: float) -> list[str]:
    """The table rank 0 prints, then one line per slow host (matmul below slow_fraction x median)."""
    median = statistics.median(r["gflops"] for r in rows)
    lines = [f"preflight: rank {r['rank']} host {r['host']} ({r['addr']}) device {r['device']}: matmul "
             f"{r['gflops']:.2f} GFLOP/s, all_reduce {r['mb_s']:.1f} MB/s" for r in rows]
    slow: dict[str, list[dict]] = {}
    for r in rows:
        if r["gflops"] < slow_fraction * median:
            slow.setdefault(r["host"], []).append(r)
    for host, rs in slow.items():
        lines.append(f"preflight: SLOW host {host}: ranks {[r['rank'] for r in rs]} at "
                     f"{min(r['gflops'] for r in rs):.2f} GFLOP/s, below {slow_fraction:g} x the median "
                     f"{median:.2f} GFLOP/s (see launch/README.md, 'A slow host')")
    lines.append(f"preflight: {len(rows)} ranks ok, median matmul {median:.2f} GFLOP/s, "
                 f"{len(slow)} slow host(s)")
    return lines


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from pipeline.train import distributed

    env = distributed.detect()
    device = distributed.choose_device(args.device, env.local_rank)
    host = socket.gethostname()
    addr = _local_address(env.master_addr, env.master_port)
    store = _check_in(env, host, addr, args.timeout_s)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=env.rank,
                            world_size=env.world_size, timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        gflops = 0.0
        for turn in range(env.world_size):  # one rank at a time
            if turn == env.rank:
                gflops = _matmul_gflops(device, args.matmul_size, args.matmul_s)
            dist.barrier()
        row = {"rank": env.rank, "host": host, "addr": addr, "device": str(device), "gflops": gflops,
               "mb_s": _allreduce_mb_s(device, args.allreduce_mb)}
        rows: list = [None] * env.world_size
        dist.all_gather_object(rows, row)
    finally:
        dist.destroy_process_group()
    if env.rank == 0:
        print("\n".join(report(rows, args.slow_fraction)), flush=True)
    return 0
