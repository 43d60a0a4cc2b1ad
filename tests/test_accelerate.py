"""`accelerate launch` starts the trainer: 2 CPU ranks through Accelerate's torchrun, same result as srun's.

`accelerate launch --cpu --num_processes 2` starts ONE process on CPU (Accelerate's multi-process CPU
mode needs mpirun and a hostfile), so the tested form is `--multi_gpu --num_processes 2` with
`train.device=cpu`: Accelerate then runs torch.distributed.run, which sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT as the trainer expects. The multi-node form is in launch/README.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

MAX_STEPS = ["train.max_steps=6"]


def _accelerate_launch(config: Path, port: int) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "pipeline", "train", "--config", str(config), *MAX_STEPS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    return dict(state)


def test_accelerate_launch_trains_two_cpu_ranks_like_srun(trainer):
    config, run_dir = trainer.config("accelerate")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _accelerate_launch(config, port)
    assert out.returncode == 0, f"accelerate launch failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    end = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"end"' in line]
    assert end and '"finished"' in end[-1] and '"step": 6' in end[-1], end
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    shards = sorted(p.name for p in (run_dir / "checkpoints" / tag).glob("*zero_pp_rank_*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards  # two ranks

    ref_config, ref_dir = trainer.config("accelerate_ref")
    ranks = trainer.run(ref_config, nproc=2, overrides=MAX_STEPS)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    accelerated, reference = _model_state(run_dir), _model_state(ref_dir)
    assert accelerated.keys() == reference.keys()
    assert all(torch.equal(accelerated[k], reference[k]) for k in reference)
