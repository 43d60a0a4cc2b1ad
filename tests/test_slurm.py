"""The SLURM launch script on a real one-node SLURM: training, preemption -> requeue -> exact resume.

The cluster (munged, slurmctld, slurmd) is started by tests/slurm/start-local-slurm.sh in a session
fixture and stopped at the end, unless it was already running (then it is left alone). Jobs run the
real `launch/rmt_l_64gpu.sh` with the real trainer on tiny fake-ImageNet shards, on CPU.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "rmt_l_64gpu.sh"
DEMO = REPO / "configs" / "demo.yaml"
START = REPO / "tests" / "slurm" / "start-local-slurm.sh"
STOP = REPO / "tests" / "slurm" / "stop-local-slurm.sh"
# Sessions on one machine share its one SLURM cluster: take turns.
LOCK = Path(tempfile.gettempdir()) / "rmt-slurm-tests.lock"
LOCK_WAIT_S = 900
JOB_TIMEOUT_S = 240
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

MAX_STEPS = 40  # long enough that the signal (sent at step 2, delivered within ~1 s) lands mid-run
# The demo recipe shrunk for a contended 2-core box; the same for every run so their weights compare.
TINY_MODEL = "model.kwargs={embed_dims: [16, 32, 64, 64], depths: [1, 1, 2, 1], num_heads: [1, 1, 2, 2]}"
OVERRIDES = [
    f"train.max_steps={MAX_STEPS}",
    "train.epochs=50",
    "train.global_batch=8",
    "train.max_batch_per_device=4",
    "optim.schedule=step",
    "model.num_classes=4",
    TINY_MODEL,
    "data.img_size=32",
    "data.eval_img_size=32",
    "train.eval_every_epochs=0",
    "checkpoint.every_steps=8",
    "checkpoint.keep=2",
    "metrics.log_every=1",
    "metrics.tensorboard=false",
    "data.workers=0",
]


def _cluster_up(env: dict[str, str]) -> bool:
    if not shutil.which("scontrol"):
        return False
    ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
    return ping.returncode == 0 and "UP" in ping.stdout


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for sbatch/scontrol against a running one-node cluster."""
    local_dir = os.environ.get("SLURM_LOCAL_DIR") or os.path.join(tempfile.gettempdir(), "local-slurm")
    local_conf = os.path.join(local_dir, "slurm.conf")
    env = dict(os.environ, SLURM_LOCAL_DIR=local_dir)
    env.setdefault("SLURM_CONF", local_conf)
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session held {LOCK} (the local SLURM) for {LOCK_WAIT_S} s")
                time.sleep(2)
        was_up = _cluster_up(env)
        if not was_up and env["SLURM_CONF"] != local_conf:  # not the cluster named by SLURM_CONF: ours
            env["SLURM_CONF"] = local_conf
            was_up = _cluster_up(env)
        if not was_up:
            if os.geteuid() != 0:
                pytest.fail("the SLURM tests need a running SLURM (set SLURM_CONF) or root to install and "
                            "start a local one: run `sudo make slurm-up`, then `make slurm-test`")
            started = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True,
                                     timeout=900)
            assert started.returncode == 0, f"{START} failed:\n{started.stdout}\n{started.stderr}"
        try:
            yield env
        finally:
            if not was_up:
                subprocess.run(["bash", str(STOP)], env=env, capture_output=True, timeout=120)


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def _wait(env: dict[str, str], job_id: str, run_dir: Path, until=None) -> dict[str, str]:
    """Poll the job until it reaches a final state (or `until(job)` holds); return its record."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = _job(env, job_id)
        if job["JobState"] in FINAL_STATES or (until is not None and until(job)):
            return job
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} still {job['JobState']} after {JOB_TIMEOUT_S} s (cancelled); "
                f"log:\n{_log(run_dir, job_id)}")


def _submit(env: dict[str, str], tmp: Path, name: str, shards: Path, overrides=(), **job_vars: str
            ) -> tuple[str, Path]:
    run_dir = tmp / name
    job_env = dict(env, CONFIG=str(DEMO), RUN_DIR=str(run_dir), SHARDS=str(shards), PYTHON=sys.executable,
                   **job_vars)
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
           "--cpus-per-task=1", "--time=30", f"--job-name=test_{name}", f"--output={tmp}/{name}.out",
           str(SCRIPT), *OVERRIDES, *overrides]
    # Submitted from outside the repository: the script must find it by itself.
    out = subprocess.run(cmd, env=job_env, cwd=tmp, capture_output=True, text=True)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0], run_dir


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # a line being written right now (no newline yet) is left for the next read
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and line.strip()]


def _tensors(obj, prefix=""):
    """Every tensor inside a checkpoint object, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}/{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}/{i}")


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint's model, EMA and optimizer partitions (both ranks)."""
    tag_dir = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = {}
    for path in sorted([*tag_dir.glob("*model_states.pt"), *tag_dir.glob("*optim_states.pt"),
                        tag_dir / "ema.pt"]):
        obj = torch.load(path, map_location="cpu", weights_only=False)
        state.update({f"{path.name}{k}": v for k, v in _tensors(obj)})
    return state


def _signal_when_training(env: dict[str, str], job_id: str, run_dir: Path, ranks: int = 2) -> int:
    """Send the time-limit warning (SIGUSR1 to the batch shell) once the trainer is past step 2; returns
    the last step logged before it."""
    def training(job):
        steps = [m["step"] for m in _metrics(run_dir) if m["kind"] == "train"]
        return job["JobState"] == "RUNNING" and bool(steps) and steps[-1] >= 2

    job = _wait(env, job_id, run_dir, until=training)
    assert job["JobState"] == "RUNNING", f"job ended before the signal:\n{_log(run_dir, job_id)}"
    return _preempt_held(env, job_id, run_dir, ranks)


def _preempt_held(env: dict[str, str], job_id: str, run_dir: Path, ranks: int) -> int:
    """`scancel --signal=USR1 --batch` with the trainer's ranks held (SIGSTOP) while the signal travels
    (scancel -> batch shell -> srun -> each node's slurmstepd -> task), until it is pending in all of
    them: however fast or slow the box, it cannot arrive after the run's last step. Returns the last step
    logged before it."""
    pids = _trainers(run_dir)
    assert len(pids) == ranks, pids
    _hold(pids)
    try:
        stopped_at = [m["step"] for m in _metrics(run_dir) if m["kind"] == "train"][-1]
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
        deadline = time.monotonic() + 60
        while (states := [_usr1(pid) for pid in pids]) != ["pending"] * ranks and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert states == ["pending"] * ranks, f"SIGUSR1 of the ranks {pids} after 60 s: {states}"
    return stopped_at


def _trainers(run_dir: Path) -> list[int]:
    """PIDs of the running trainer tasks of this run, on every node."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmd and f"output_dir={run_dir}".encode() in cmd and \
                os.fsdecode(cmd[0]).rsplit("/", 1)[-1].startswith("python"):
            pids.append(int(proc.name))
    return pids


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _usr1(pid: int) -> str:
    """The process's SIGUSR1: 'pending' (sent, not yet handled), else 'caught', 'ignored' or 'default'."""
    status, bit = _status(pid), 1 << (signal.SIGUSR1 - 1)
    return next((name for key, name in (("ShdPnd", "pending"), ("SigPnd", "pending"), ("SigCgt", "caught"),
                                        ("SigIgn", "ignored")) if int(status[key], 16) & bit), "default")


def _hold(pids: list[int]) -> None:
    """SIGSTOP the processes and wait until every one is stopped."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while any(_status(pid)["State"][0] != "T" for pid in pids):
        assert time.monotonic() < deadline, f"{pids} not all stopped after 30 s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tiny_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    job_id, run_dir = _submit(slurm_env, tmp, "plain", tiny_shards)
    return job_id, run_dir, _wait(slurm_env, job_id, run_dir)


def test_sbatch_trains_two_ranks_and_checkpoints(uninterrupted):
    job_id, run_dir, job = uninterrupted
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert "world size 2" in log and "device: cpu" in log
    assert any(line.startswith("0: ") for line in log.splitlines())
    assert any(line.startswith("1: ") for line in log.splitlines())
    metrics = _metrics(run_dir)
    assert metrics[-1]["kind"] == "end" and metrics[-1]["reason"] == "finished", metrics[-1]
    assert metrics[-1]["step"] == MAX_STEPS
    assert [m["step"] for m in metrics if m["kind"] == "train"][-1] == MAX_STEPS
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step_{MAX_STEPS:08d}"
    shards = sorted(p.name for p in (run_dir / "checkpoints" / tag).rglob("*zero_pp_rank_*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    # the periodic checkpoints were written too (keep=2: the last two)
    assert len(list((run_dir / "checkpoints").glob("step_*"))) == 2


def test_preemption_requeues_resumes_and_matches_uninterrupted(slurm_env, tiny_shards, uninterrupted,
                                                                tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    job_id, run_dir = _submit(slurm_env, tmp, "preempted", tiny_shards)
    stopped_at = _signal_when_training(slurm_env, job_id, run_dir)
    job = _wait(slurm_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "requeuing job" in log and "start 2 (requeued 1 times" in log, log

    ends = [m for m in _metrics(run_dir) if m["kind"] == "end"]
    assert [e["reason"] for e in ends] == ["signal", "finished"], ends
    # within the step in progress or the next (a rank may already be in its stop vote)
    assert stopped_at < ends[0]["step"] <= stopped_at + 2 < MAX_STEPS and ends[1]["step"] == MAX_STEPS
    assert f"resume from: {run_dir}/checkpoints/step_{ends[0]['step']:08d}" in log

    reference, resumed = _final_state(uninterrupted[1]), _final_state(run_dir)
    assert reference.keys() == resumed.keys() and len(reference) > 0
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:5]}"


def test_real_failure_is_not_requeued(slurm_env, tiny_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    site = tmp / "site.sh"  # a site setup file (modules, NCCL settings) is sourced first
    site.write_text("export NCCL_SOCKET_IFNAME=lo\n")
    job_id, run_dir = _submit(slurm_env, tmp, "broken", tiny_shards, ["train.no_such_key=1"],
                              SITE_SETUP=str(site))
    job = _wait(slurm_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "2:0", "0"), log
    assert f"site setup: {site}" in log and "NCCL_SOCKET_IFNAME=lo" in log, log
    assert "no_such_key" in log, log
    # the launcher's batch-plan check rejects the bad key before srun starts any task
    assert "error: unknown config key 'train.no_such_key'" in log, log
    assert "training FAILED" not in log, log  # no task was started (Restarts 0 above: not requeued)


def test_requeue_limit_stops_the_loop_and_resubmitting_resumes(slurm_env, tiny_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    job_id, run_dir = _submit(slurm_env, tmp, "limited", tiny_shards, MAX_REQUEUES="0")
    _signal_when_training(slurm_env, job_id, run_dir)
    job = _wait(slurm_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "75:0", "0"), log
    assert "NOT requeuing: this job was already requeued 0 times (MAX_REQUEUES=0)" in log, log
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert f"resume point: {run_dir}/checkpoints/{tag}" in log, log

    # the same command again (a new job) continues from there
    job_id, _ = _submit(slurm_env, tmp, "limited", tiny_shards, MAX_REQUEUES="0")
    job = _wait(slurm_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert f"resume from: {run_dir}/checkpoints/{tag}" in log, log
    ends = [m for m in _metrics(run_dir) if m["kind"] == "end"]
    assert [(e["reason"], e["step"]) for e in ends] == [("signal", int(tag[5:])), ("finished", MAX_STEPS)]


def test_missing_shards_fail_at_once_with_a_clear_message(slurm_env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    job_id, run_dir = _submit(slurm_env, tmp, "noshards", tmp / "no_such_shards")
    job = _wait(slurm_env, job_id, run_dir)
    out = (tmp / "noshards.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "2:0", "0"), out
    assert f"SHARDS={tmp}/no_such_shards has no manifest.json" in out, out
