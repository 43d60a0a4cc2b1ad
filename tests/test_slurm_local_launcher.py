"""launch/local.sh (torchrun, one machine): SIGTERM -> checkpoint and exit 75; the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "launch" / "local.sh"
DEMO = REPO / "configs" / "demo.yaml"
TINY_MODEL = "model.kwargs={embed_dims: [16, 32, 64, 64], depths: [1, 1, 2, 1], num_heads: [1, 1, 2, 2]}"
OVERRIDES = [TINY_MODEL, "train.epochs=50", "train.global_batch=8", "train.max_batch_per_device=4",
             "optim.schedule=step", "model.num_classes=4", "data.img_size=32",
             "data.eval_img_size=32", "train.eval_every_epochs=0", "metrics.log_every=1",
             "metrics.tensorboard=false", "data.workers=0", "checkpoint.every_steps=0"]


def _train_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    # a line being written right now (no newline yet) is left for the next read
    return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]


def test_local_launcher_checkpoints_on_sigterm_and_resumes(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, NPROC="2", CONFIG=str(DEMO), RUN_DIR=str(run_dir), SHARDS=str(tiny_shards),
               PYTHON=sys.executable)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(["bash", str(LOCAL), "train.max_steps=1000", *OVERRIDES], env=env,
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not any(m["kind"] == "train" for m in _train_steps(run_dir)):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"no training step within 180 s:\n{(tmp_path / 'first.log').read_text()}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=180)
    first = (tmp_path / "first.log").read_text()
    assert rc == 75, first
    ends = [m for m in _train_steps(run_dir) if m["kind"] == "end"]
    assert [e["reason"] for e in ends] == ["signal"], first
    stopped = ends[0]["step"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"

    again = subprocess.run(["bash", str(LOCAL), f"train.max_steps={stopped + 3}", *OVERRIDES], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resume from: {run_dir}/checkpoints/step_{stopped:08d}" in again.stdout
    ends = [m for m in _train_steps(run_dir) if m["kind"] == "end"]
    assert [(e["reason"], e["step"]) for e in ends] == [("signal", stopped), ("finished", stopped + 3)]
