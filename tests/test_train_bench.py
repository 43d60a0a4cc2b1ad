"""`bench/bench_gpu.py --smoke`: every case of the GPU benchmark (synthetic with and without activation
checkpointing, loader-fed) runs on CPU with a tiny RMT, so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_smoke(tmp_path):
    out = tmp_path / "gpu.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    cmd = [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["grad_ckpt"], r["input"]) for r in rows] == [(False, "synthetic"), (True, "synthetic"),
                                                           (False, "loader")]
    assert all(r["images_per_s"] > 0 and r["loss"] > 0 for r in rows)
    # activation checkpointing recomputes, it does not change the result
    assert rows[0]["loss"] == rows[1]["loss"]
    assert "| rmt_t loader |" in proc.stdout
