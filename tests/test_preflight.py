"""`python -m pipeline preflight` as real CPU ranks (gloo): the report, a slow host named, a missing rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from pipeline.train.preflight import report


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(world: int, started: int, timeout_s: float = 5.0, **env: str) -> list[subprocess.CompletedProcess]:
    """Start `started` of `world` ranks of the preflight command; return their results."""
    port = _port()
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "preflight", "--device", "cpu",
                               "--timeout-s", str(timeout_s), "--matmul-s", "0.1", "--allreduce-mb", "1"],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "OMP_NUM_THREADS": "1", **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(started)]
    outs = [p.communicate(timeout=120) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs, strict=True)]


def test_two_ranks_report_host_matmul_and_allreduce():
    out = _ranks(2, 2)
    assert [p.returncode for p in out] == [0, 0], out[0].stderr[-2000:]
    lines = out[0].stdout.splitlines()
    host = socket.gethostname()
    assert lines[0].startswith(f"preflight: rank 0 host {host} (127.0.0.1) device cpu: matmul "), lines
    assert lines[1].startswith(f"preflight: rank 1 host {host}"), lines
    assert "GFLOP/s" in lines[1] and "MB/s" in lines[1]
    assert lines[-1].startswith("preflight: 2 ranks ok") and "0 slow host(s)" in lines[-1]


def test_a_rank_that_never_checks_in_fails_fast_naming_the_missing_rank_and_its_host():
    """Ranks 2, 3 of 4 (2 per host, as srun places them) never start: rank 0 names them and host b."""
    out = _ranks(4, 2, timeout_s=3, RMT_NODE_HOSTS="a,b", SLURM_NTASKS_PER_NODE="2")
    assert out[0].returncode == 1, out[0].stderr
    assert "error: preflight: ranks [2, 3] (on b) did not check in" in out[0].stderr, out[0].stderr
    assert f"hosts that did: {socket.gethostname()}" in out[0].stderr


def test_slow_host_is_named():
    rows = [{"rank": r, "host": h, "addr": "x", "device": "cpu", "gflops": g, "mb_s": 1.0}
            for r, h, g in [(0, "node1", 10.0), (1, "node1", 11.0), (2, "node2", 2.0), (3, "node3", 9.0)]]
    lines = report(rows, 0.5)
    slow = [line for line in lines if "SLOW" in line]
    assert len(slow) == 1 and "SLOW host node2: ranks [2] at 2.00 GFLOP/s" in slow[0], lines
    assert lines[-1].endswith("1 slow host(s)")
