"""The SLURM launch script across two nodes (network namespaces): training, preemption, a lost node.

The cluster (munged, slurmctld, one slurmd per node, each node in its own network + UTS namespace with
its own address and host name) is started by tests/slurm/start-multinode-slurm.sh in a session fixture
and stopped at the end, unless it was already up. Jobs run the real `launch/rmt_l_64gpu.sh` with the
real trainer (gloo on CPU) on the tiny shards of tests/test_slurm.py, with its tiny recipe.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_slurm import (
    DEMO,
    FINAL_STATES,
    OVERRIDES,
    SCRIPT,
    _final_state,
    _job,
    _log,
    _metrics,
    _wait,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
START = REPO / "tests" / "slurm" / "start-multinode-slurm.sh"
STOP = REPO / "tests" / "slurm" / "stop-multinode-slurm.sh"
MN_DIR = os.path.join(tempfile.gettempdir(), "mn-slurm")
# Its own lock: the multi-node cluster (ports 7817/7818, 10.77.0.0/24) can run beside the one-node one.
LOCK = Path(tempfile.gettempdir()) / "rmt-slurm-multinode.lock"
LOCK_WAIT_S = 900
MAX_STEPS = 16
STEPS = [f"train.max_steps={MAX_STEPS}", "train.eval_every_epochs=2"]  # after OVERRIDES: later wins
NODE_IP = {"node1": "10.77.0.11", "node2": "10.77.0.12"}
COLLECTIVE_TIMEOUT_S = 15  # below what SLURM needs to call a silent node dead here (~25 s)


def _start(env: dict[str, str]) -> None:
    """Start (or repair: re-up links, restart a killed slurmd, resume DOWN nodes) the 2-node cluster."""
    out = subprocess.run(["bash", str(START), "2"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{START} failed:\n{out.stdout}\n{out.stderr}"


@pytest.fixture(scope="session")
def mn_env():
    """Environment for sbatch/scontrol against the 2-node cluster (4 CPUs per node: 4 ranks fit on one)."""
    env = dict(os.environ, MN_SLURM_DIR=MN_DIR, MN_SLURM_CPUS="4",
               SLURM_CONF=os.path.join(MN_DIR, "slurm.conf"))
    if os.geteuid() != 0:
        pytest.skip("the multi-node SLURM tests create network namespaces: run them as root")
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session held {LOCK} for {LOCK_WAIT_S} s")
                time.sleep(2)
        ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
        was_up = ping.returncode == 0 and "UP" in ping.stdout
        _start(env)
        try:
            yield env
        finally:
            if not was_up:
                subprocess.run(["bash", str(STOP)], env=env, capture_output=True, timeout=120)


def _submit(env, tmp: Path, name: str, shards: Path, nodes: int, tasks_per_node: int, overrides=(),
            run_dir: Path | None = None) -> tuple[str, Path]:
    run_dir = run_dir or tmp / name
    job_env = dict(env, CONFIG=str(DEMO), RUN_DIR=str(run_dir), SHARDS=str(shards), PYTHON=sys.executable,
                   PYTHONPATH=str(REPO))
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
           "--gpus-per-node=0", "--cpus-per-task=1", "--time=30", f"--job-name=mn_{name}",
           f"--output={tmp}/{name}.out", str(SCRIPT), *OVERRIDES, *STEPS, *overrides]
    out = subprocess.run(cmd, env=job_env, cwd=tmp, capture_output=True, text=True)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0], run_dir


def _preflight_hosts(log: str) -> dict[int, tuple[str, str]]:
    """rank -> (host, address) from the preflight table in the job log."""
    found = re.findall(r"preflight: rank (\d+) host (\S+) \((\S+)\)", log)
    return {int(rank): (host, addr) for rank, host, addr in found}


def _train_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in _metrics(run_dir) if m["kind"] == "train"]


def _compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[list[str], float]:
    """Names of the tensors that differ, and the largest absolute difference."""
    assert a.keys() == b.keys() and len(a) > 0
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    largest = max(((a[k].double() - b[k].double()).abs().max().item() for k in differ), default=0.0)
    return differ, largest


@pytest.fixture(scope="module")
def two_nodes(mn_env, tiny_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mn")
    t0 = time.monotonic()
    job_id, run_dir = _submit(mn_env, tmp, "two_nodes", tiny_shards, nodes=2, tasks_per_node=2)
    job = _wait(mn_env, job_id, run_dir)
    print(f"2 nodes x 2 ranks, {MAX_STEPS} steps: {time.monotonic() - t0:.1f} s")
    return job_id, run_dir, job


def test_two_nodes_train_evaluate_and_checkpoint(two_nodes):
    job_id, run_dir, job = two_nodes
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert job["NodeList"] == "node[1-2]" and "world size 4" in log, log
    # ranks 2 and 3 ran inside node2's namespace: its host name and its own address
    assert _preflight_hosts(log) == {0: ("node1", NODE_IP["node1"]), 1: ("node1", NODE_IP["node1"]),
                                     2: ("node2", NODE_IP["node2"]), 3: ("node2", NODE_IP["node2"])}, log
    assert "master: node1:" in log
    metrics = _metrics(run_dir)
    assert metrics[-1]["kind"] == "end" and metrics[-1]["reason"] == "finished", metrics[-1]
    assert _train_steps(run_dir)[-1] == MAX_STEPS
    assert any(m["kind"] == "eval" for m in metrics), "no evaluation"
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    shards = sorted(p.name for p in (run_dir / "checkpoints" / tag).glob("*zero_pp_rank_*optim_states.pt"))
    assert [s.split("_mp_")[0] for s in shards] == [f"zero_pp_rank_{r}" for r in range(4)], shards


def test_two_nodes_match_one_node_with_four_ranks(two_nodes, mn_env, tiny_shards, tmp_path_factory):
    """The same 4-rank job on one host: gloo's all_reduce does not depend on where the ranks live."""
    tmp = tmp_path_factory.mktemp("mn")
    job_id, run_dir = _submit(mn_env, tmp, "one_node", tiny_shards, nodes=1, tasks_per_node=4)
    job = _wait(mn_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert {host for host, _ in _preflight_hosts(log).values()} == {job["NodeList"]}, log
    differ, largest = _compare(_final_state(two_nodes[1]), _final_state(run_dir))
    print(f"2 nodes vs 1 node (4 ranks each): {len(differ)} tensors differ, largest difference {largest:g}")
    assert not differ, f"{len(differ)} tensors differ (largest {largest:g}), e.g. {differ[:5]}"


def test_preemption_across_nodes_requeues_resumes_and_matches(two_nodes, mn_env, tiny_shards,
                                                              tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mn")
    t0 = time.monotonic()
    job_id, run_dir = _submit(mn_env, tmp, "preempted", tiny_shards, nodes=2, tasks_per_node=2)

    def training(job):
        steps = _train_steps(run_dir)
        return job["JobState"] == "RUNNING" and bool(steps) and steps[-1] >= 2

    job = _wait(mn_env, job_id, run_dir, until=training)
    assert job["JobState"] == "RUNNING", _log(run_dir, job_id)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=mn_env, check=True)
    job = _wait(mn_env, job_id, run_dir)
    print(f"preempted 2-node job: {time.monotonic() - t0:.1f} s")
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "requeuing job" in log and "start 2 (requeued 1 times" in log, log
    ends = [m for m in _metrics(run_dir) if m["kind"] == "end"]
    assert [e["reason"] for e in ends] == ["signal", "finished"], ends
    assert 2 <= ends[0]["step"] < MAX_STEPS and ends[1]["step"] == MAX_STEPS
    # every rank on both nodes stopped at that step: the 4-rank start 2 resumed from its checkpoint
    # (checkpoint.keep=2 has removed it since), and the end state matches
    assert f"resume from: {run_dir}/checkpoints/step_{ends[0]['step']:08d}" in log
    exited = re.findall(r"srun: error: (node\d): tasks? (\d+)(?:-(\d+))?: Exited with exit code 75",
                        log.split("start 2 (requeued")[0])
    ranks = {r: node for node, a, b in exited for r in range(int(a), int(b or a) + 1)}
    assert ranks == {0: "node1", 1: "node1", 2: "node2", 3: "node2"}, log  # every rank saved, exited 75
    assert job["NodeList"] == "node[1-2]"
    differ, largest = _compare(_final_state(two_nodes[1]), _final_state(run_dir))
    assert not differ, f"{len(differ)} tensors differ (largest {largest:g}), e.g. {differ[:5]}"


def _ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout
    return [int(p) for p in out.split()]


def _kill_node(node: str) -> None:
    """The node dies: its slurmd and every process in its namespace SIGKILLed at once."""
    for pid in _ns_pids(f"mn-{node}"):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _cut_link(node: str) -> None:
    """The node's network goes: its only link down (processes live on, unreachable)."""
    subprocess.run(["ip", "-n", f"mn-{node}", "link", "set", "mn0", "down"], check=True)


def _slurm_view(env, job_id: str) -> str:
    nodes = subprocess.run(["sinfo", "-N", "-h", "-o", "%N %T %E"], env=env, capture_output=True,
                           text=True).stdout
    job = _job(env, job_id)
    return (f"job {job_id}: {job['JobState']} reason {job.get('Reason')} exit {job['ExitCode']} "
            f"restarts {job['Restarts']}; nodes: {' | '.join(nodes.strip().splitlines())}")


@pytest.mark.parametrize("how", ["killed", "link_cut"])
def test_lost_node_ends_survivors_then_one_node_resumes(how, mn_env, tiny_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mn")
    long_run = ["train.max_steps=400", f"train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
                "checkpoint.every_steps=4"]
    job_id, run_dir = _submit(mn_env, tmp, f"lost_{how}", tiny_shards, nodes=2, tasks_per_node=2,
                              overrides=long_run)
    job = _wait(mn_env, job_id, run_dir, until=lambda j: j["JobState"] == "RUNNING" and
                (run_dir / "checkpoints" / "latest").exists() and _train_steps(run_dir)[-1] >= 6)
    assert job["JobState"] == "RUNNING", _log(run_dir, job_id)
    (_kill_node if how == "killed" else _cut_link)("node2")
    t_lost = time.monotonic()
    lost_step = _train_steps(run_dir)[-1]
    try:
        # The survivors (ranks 0, 1 on node1) end by themselves: the ranks' own output says so.
        deadline = t_lost + 3 * COLLECTIVE_TIMEOUT_S
        log = _log(run_dir, job_id)
        # (or SLURM ends them first, when it has called node2 dead: "... DUE TO NODE FAILURE")
        ended = r"^[01]: (?:error: .*|slurmstepd-node1: error: .* DUE TO NODE FAILURE.*)$"
        while time.monotonic() < deadline and not re.search(ended, log, re.M):
            time.sleep(0.5)
            log = _log(run_dir, job_id)
        waited = time.monotonic() - t_lost
        errors = re.findall(ended, log, re.M)
        print(f"node2 {how} after step {lost_step}: survivors ended after {waited:.1f} s ({errors[:1]}); "
              f"{_slurm_view(mn_env, job_id)}")
        assert errors, f"no error from the ranks on node1 within {3 * COLLECTIVE_TIMEOUT_S} s:\n{log}"
        assert waited < COLLECTIVE_TIMEOUT_S + 15, errors
        assert any(re.search(r"step \d+", e) for e in errors), errors
        # TODO(issue 11, lead): the message should name the lost peer (rank/host), which the trainer's
        # watchdog does not know today; see the report.

        job = _wait(mn_env, job_id, run_dir, until=lambda j: j["JobState"] in ("PENDING", *FINAL_STATES))
        print(f"SLURM after the loss: {_slurm_view(mn_env, job_id)}")
        subprocess.run(["scancel", job_id], env=mn_env)
        _wait(mn_env, job_id, run_dir)
    finally:
        _start(mn_env)  # bring node2 back: link up, slurmd restarted, node resumed
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert len(list((run_dir / "checkpoints" / tag).glob("*zero_pp_rank_*optim_states.pt"))) == 4

    # One node resumes (world size 4 -> 2 through the universal checkpoint) and finishes.
    # TODO(issue 10 / data.trace, lead): keep the global batch across this resume (train.global_batch)
    # and check the per-sample trace; today the global batch halves with the world size.
    resume_steps = f"train.max_steps={int(tag[5:]) + 4}"
    job_id, _ = _submit(mn_env, tmp, f"lost_{how}", tiny_shards, nodes=1, tasks_per_node=2,
                        overrides=[*long_run, resume_steps], run_dir=run_dir)
    job = _wait(mn_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert f"resume from: {run_dir}/checkpoints/{tag}" in log, log
    assert (run_dir / "checkpoints" / f"{tag}_universal").exists() or "universal" in log, log
    assert _metrics(run_dir)[-1]["reason"] == "finished"


def _trainer_usr1(run_dir: Path) -> list[str]:
    """For each running trainer task of this run: 'ignored', 'caught' or 'default' (its SIGUSR1 state)."""
    states = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except (OSError, ValueError):
            continue
        if b"train" in cmd and f"output_dir={run_dir}".encode() in cmd and cmd[0].endswith(b"python"):
            masks = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Sig"))
            bit = 1 << (10 - 1)  # SIGUSR1 = 10
            states.append("caught" if int(masks["SigCgt"], 16) & bit else
                          "ignored" if int(masks["SigIgn"], 16) & bit else "default")
    return states


@pytest.mark.parametrize("when", ["preflight", "trainer_starting"])
def test_early_signal_is_not_lost(when, mn_env, tiny_shards, tmp_path_factory):
    """USR1 before the trainer's handler exists: the job requeues (and checkpoints if it trained)."""
    tmp = tmp_path_factory.mktemp("mn")
    job_id, run_dir = _submit(mn_env, tmp, f"early_{when}", tiny_shards, nodes=1, tasks_per_node=2,
                              overrides=["train.max_steps=8"])
    if when == "preflight":  # the batch shell has its trap (it logged the train command); preflight starts
        _wait(mn_env, job_id, run_dir, until=lambda j: "] train: " in _log(run_dir, job_id))
    else:  # the trainer's processes exist, USR1 still ignored: Python has not installed its handler
        _wait(mn_env, job_id, run_dir, until=lambda j: "ignored" in _trainer_usr1(run_dir))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=mn_env, check=True)
    job = _wait(mn_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    ends = [(m["reason"], m["step"]) for m in _metrics(run_dir) if m["kind"] == "end"]
    if when == "preflight":
        assert "SIGUSR1 before training started: requeuing job" in log, log
        assert ends == [("finished", 8)], ends
    else:  # the trainer got the re-sent signal once its handler was in: one step, checkpoint, exit 75
        assert "training stopped after saving a checkpoint (exit 75): requeuing job" in log, log
        assert [reason for reason, _ in ends] == ["signal", "finished"] and ends[0][1] < 8, ends


def _processes(ns: str, word: bytes) -> list[int]:
    """PIDs in netns `ns` whose command line contains `word`."""
    found = []
    for pid in _ns_pids(ns):
        try:
            if word in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def _log_until(run_dir: Path, job_id: str, pattern: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = _log(run_dir, job_id)
        if re.search(pattern, log, re.M):
            return log
        time.sleep(0.3)
    return _log(run_dir, job_id)


def test_preflight_fails_the_job_when_a_node_cannot_reach_rank_0(mn_env, tiny_shards, tmp_path_factory):
    """node2 loses its route to node1 as its preflight starts: the job fails naming node2, no training."""
    tmp = tmp_path_factory.mktemp("mn")
    t0 = time.monotonic()
    job_id, run_dir = _submit(mn_env, tmp, "unreachable", tiny_shards, nodes=2, tasks_per_node=2)
    job = _wait(mn_env, job_id, run_dir, until=lambda j: bool(_processes("mn-node2", b"preflight")))
    route = ["ip", "-n", "mn-node2", "route", "add", "blackhole", f"{NODE_IP['node1']}/32"]
    subprocess.run(route, check=True)
    try:
        log = _log_until(run_dir, job_id, r"^0: error: preflight", 60)
        failed_after = time.monotonic() - t0
    finally:
        subprocess.run([*route[:4], "del", *route[5:]], check=True)
    job = _wait(mn_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    print(f"unreachable node2: rank 0's error {failed_after:.1f} s after submit; job {job['JobState']} "
          f"{job['ExitCode']} after {time.monotonic() - t0:.1f} s")
    assert "0: error: preflight: ranks [2, 3] did not check in" in log and "hosts that did: node1" in log, log
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "1:0", "0"), log
    assert re.search(r"preflight FAILED \(exit \d+\); NOT training", log), log  # srun: the killed tasks' code
    assert not _metrics(run_dir), "training started"
