"""Distributed setup: rank/world from torchrun or SLURM variables, device choice, process group.

Order of precedence (the run contract): RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (torchrun,
the deepspeed launcher, accelerate), else SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST
(srun; first host is the master, port from MASTER_PORT or derived from SLURM_JOB_ID), else a single
process.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pipeline.errors import InputError


class DistributedSetupError(InputError, RuntimeError):
    """The launcher's environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise DistributedSetupError(f"SLURM_JOB_NODELIST '{nodelist}' is not a host list")
    prefix, bracket = head.group(1), head.group(3)
    if not bracket:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def _int_env(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={env[name]!r} is not an integer") from None


def detect(env: dict | None = None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
        return DistEnv(rank, world, local, addr, port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            addr = first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        elif world == 1:
            addr = "127.0.0.1"
        else:
            raise DistributedSetupError(
                "SLURM_NTASKS > 1 but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        else:
            port = 20000 + _int_env(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else 29500
        return DistEnv(rank, world, local, addr, port, "slurm")
    port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
    return DistEnv(0, 1, 0, "127.0.0.1", port, "single")


def _free_port() -> int:
    """A single process needs no agreed port: take a free one, so two runs on one machine never clash."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_device(kind: str, local_rank: int) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError(
                "train.device=cuda but no CUDA device is visible: use train.device=cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(dist_env: DistEnv, device: torch.device, timeout_s: int) -> None:
    """Initialise torch.distributed through the engine backend (nccl on CUDA, gloo on CPU) with a timeout."""
    from pipeline.train.engines import backend

    os.environ.update({
        "RANK": str(dist_env.rank), "WORLD_SIZE": str(dist_env.world_size),
        "LOCAL_RANK": str(dist_env.local_rank), "MASTER_ADDR": dist_env.master_addr,
        "MASTER_PORT": str(dist_env.master_port),
    })
    # a dead peer must end the job, not hang it
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    try:
        backend().init_distributed(dist_env.rank, dist_env.world_size, device, timeout_s)
    except RuntimeError as e:
        if "address already in use" in str(e).lower() or "EADDRINUSE" in str(e):
            raise DistributedSetupError(
                f"MASTER_PORT={dist_env.master_port} on {dist_env.master_addr} is already in use (another "
                f"run on this machine?): set MASTER_PORT to a free port") from None
        raise


@contextmanager
def process_group(dist_env: DistEnv, device: torch.device, timeout_s: int) -> Iterator[None]:
    """`init` for the block, and the group destroyed on every way out of it, errors included: a gloo group
    left to the interpreter's exit can abort the process ("terminate called without an active exception",
    exit -6) after the error line was printed."""
    init(dist_env, device, timeout_s)
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def from_rank0(obj):
    """Rank 0's `obj` (picklable) on every rank: for what every rank must decide alike."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def average_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace every tensor by its mean over all ranks, in place, with one all_reduce. The sum runs in
    float64, so tensors already equal on every rank stay exactly as they are at any world size."""
    import torch.distributed as dist

    if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, mean in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(mean.view_as(t))


class Heartbeats:
    """Each rank's last sign of life in rank 0's TCP store, so a rank stuck in a collective can name the
    peers that went silent (a cut link leaves them alive but unheard), or say that it cannot reach rank 0.

    Uses its own client connection (MASTER_ADDR:MASTER_PORT, set by `init`) with a short timeout, from
    the watchdog's thread. Ages compare wall clocks across hosts (NTP keeps them within milliseconds).
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        from torch.distributed import TCPStore

        self.rank, self.world_size = rank, world_size
        self.host = socket.gethostname()
        self.master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        self.store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        self.unreachable_since: float | None = None
        self.beat()

    def beat(self) -> None:
        try:
            self.store.set(f"rmt/alive/{self.rank}", f"{self.host} {time.time():.3f}")
            self.unreachable_since = None
        except RuntimeError:  # DistStoreError: rank 0's store did not answer within the timeout
            self.unreachable_since = self.unreachable_since or time.time()

    def silent(self, older_than_s: float) -> str:
        """Which ranks (and hosts) have not been heard from for `older_than_s`, as a clause for a message."""
        now = time.time()
        if self.unreachable_since is not None:
            return (f"this host ({self.host}) has not reached rank 0's store at {self.master} for "
                    f"{now - self.unreachable_since:.0f} s: it is cut off, or rank 0's host is lost")
        silent = []
        try:
            for r in range(self.world_size):
                host, stamp = self.store.get(f"rmt/alive/{r}").decode().split()
                if now - float(stamp) > older_than_s:
                    silent.append(f"rank {r} on {host} (silent {now - float(stamp):.0f} s)")
        except RuntimeError as e:
            return f"rank 0's store at {self.master} does not answer ({str(e).splitlines()[0][:100]})"
        if not silent:
            return "every rank's heartbeat is fresh (a rank is stuck, not lost)"
        return "lost peer(s): " + ", ".join(silent)
