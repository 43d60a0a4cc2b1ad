"""The SLURM launch script across two nodes (network namespaces): training, preemption, a lost node.

The cluster (munged, slurmctld, one slurmd per node, each node in its own network + UTS namespace with
its own address and host name) is started by tests/slurm/start-multinode-slurm.sh in a session fixture
and stopped at the end, unless it was already up. Jobs run the real `launch/rmt_l_64gpu.sh` with the
real trainer (gloo on CPU) on the tiny shards of tests/test_slurm.py, with its tiny recipe.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
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
    _cluster_up,
    _final_state,
    _job,
    _log,
    _metrics,
    _signal_when_training,
    _status,
    _usr1,
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
# after OVERRIDES (later wins); every job records the samples each step trained (data.trace)
STEPS = [f"train.max_steps={MAX_STEPS}", "train.eval_every_epochs=2", "data.trace=true"]
GLOBAL_BATCH = 8  # OVERRIDES' train.global_batch
NODE_IP = {"node1": "10.77.0.11", "node2": "10.77.0.12"}
# A cut link: the ranks on node1 must end by their watchdog, which fires COLLECTIVE_TIMEOUT_S plus at most
# one heartbeat period (a fifth of it) after the hung phase began (15-18 s here), before SLURM calls node2
# dead and kills the job. slurmctld pings a node every SlurmdTimeout/3 s when its last answer is older than
# that, and downs it at the first ping cycle that finds the last answer older than SlurmdTimeout as of the
# cycle before: 2/3 to 5/3 x SlurmdTimeout after the loss (src/slurmctld/ping_nodes.c), 24-60 s with 36.
# A healthy phase (a step, a save, an evaluation) took at most 0.3 s here (the test prints the longest).
COLLECTIVE_TIMEOUT_S = 15
SLURMD_TIMEOUT_S = 36


def _start(env: dict[str, str]) -> None:
    """Start (or repair: re-up links, restart a killed slurmd, resume DOWN nodes) the 2-node cluster."""
    out = subprocess.run(["bash", str(START), "2"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{START} failed:\n{out.stdout}\n{out.stderr}"


@pytest.fixture(scope="session")
def mn_env():
    """Environment for sbatch/scontrol against the 2-node cluster (4 CPUs per node: 4 ranks fit on one).
    The start script installs SLURM and munge when they are missing, so this file also runs alone."""
    env = dict(os.environ, MN_SLURM_DIR=MN_DIR, MN_SLURM_CPUS="4",
               MN_SLURM_SLURMD_TIMEOUT=str(SLURMD_TIMEOUT_S), SLURM_CONF=os.path.join(MN_DIR, "slurm.conf"))
    if os.geteuid() != 0:  # like the one-node tests without a cluster: fail, saying what to do
        pytest.fail("the multi-node SLURM tests need root (they create network namespaces, kill a node's "
                    "processes, cut its link): run `sudo make slurm-test`, or deselect them: -m 'not slurm'")
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
        was_up = _cluster_up(env)  # False also when SLURM is not installed yet
        _start(env)
        try:
            yield env
        finally:
            if not was_up:
                subprocess.run(["bash", str(STOP)], env=env, capture_output=True, timeout=120)


def _submit(env, tmp: Path, name: str, shards: Path, nodes: int, tasks_per_node: int, overrides=(),
            run_dir: Path | None = None, sbatch_args=(), **job_vars: str) -> tuple[str, Path]:
    run_dir = run_dir or tmp / name
    job_env = dict(env, CONFIG=str(DEMO), RUN_DIR=str(run_dir), SHARDS=str(shards), PYTHON=sys.executable,
                   PYTHONPATH=str(REPO))
    job_env.update(job_vars)
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
           "--gpus-per-node=0", "--cpus-per-task=1", "--time=30", f"--job-name=mn_{name}",
           f"--output={tmp}/{name}.out", *sbatch_args, str(SCRIPT), *OVERRIDES, *STEPS, *overrides]
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
    """The uninterrupted 2-node x 2-rank run the other jobs are compared with (weights and samples)."""
    tmp = tmp_path_factory.mktemp("mn")
    job_id, run_dir = _submit(mn_env, tmp, "two_nodes", tiny_shards, nodes=2, tasks_per_node=2)
    return job_id, run_dir, _wait(mn_env, job_id, run_dir)


def test_two_nodes_train_evaluate_and_checkpoint(two_nodes):
    job_id, run_dir, job = two_nodes
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert job["NodeList"] == "node[1-2]" and "world size 4" in log, log
    assert f"batch: global batch {GLOBAL_BATCH} = 4 ranks x 2 micro-batch x 1 accumulation" in log, log
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


def test_preemption_across_nodes_requeues_resumes_and_matches(two_nodes, mn_env, tiny_shards,
                                                              tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mn")
    job_id, run_dir = _submit(mn_env, tmp, "preempted", tiny_shards, nodes=2, tasks_per_node=2)
    stopped_at = _signal_when_training(mn_env, job_id, run_dir, ranks=4)
    job = _wait(mn_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "requeuing job" in log and "start 2 (requeued 1 times" in log, log
    ends = [m for m in _metrics(run_dir) if m["kind"] == "end"]
    assert [e["reason"] for e in ends] == ["signal", "finished"], ends
    # stopped within the step in progress or the next (a rank may already be in its stop vote)
    assert stopped_at < ends[0]["step"] <= stopped_at + 2 < MAX_STEPS, (stopped_at, ends)
    assert ends[1]["step"] == MAX_STEPS
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


# Put in front of the real scontrol (PATH) for one job: holds the batch script's first command
# (`scontrol show job`, before common.sh has set its trap) while the hold file exists.
HOLD_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show job" ] && [ -e "$RMT_TEST_HOLD" ]; then
  touch "$RMT_TEST_HOLD.held"; while [ -e "$RMT_TEST_HOLD" ]; do sleep 0.1; done
fi
exec {real} "$@"
"""
# PYTHON for one job: holds each `python -m pipeline $RMT_TEST_HOLD_COMMAND` task (on $RMT_TEST_HOLD_NODE
# only, when set) before Python starts, while the hold file exists; a marker file per held task (rank).
HOLD_PYTHON = """#!/bin/bash
if [ "$3" = "$RMT_TEST_HOLD_COMMAND" ] && [ -e "$RMT_TEST_PYTHON_HOLD" ] \\
    && [ "${{RMT_TEST_HOLD_NODE:-$SLURMD_NODENAME}}" = "$SLURMD_NODENAME" ]; then
  touch "$RMT_TEST_PYTHON_HOLD.$SLURM_PROCID"; while [ -e "$RMT_TEST_PYTHON_HOLD" ]; do sleep 0.1; done
fi
exec {python} "$@"
"""


def _python_hold(tmp: Path, command: str, node: str = "") -> tuple[Path, dict[str, str]]:
    """The hold file (it exists: tasks will be held) and the job variables that put HOLD_PYTHON in place."""
    wrapper, hold = tmp / "hold-python", tmp / "python_hold"
    wrapper.write_text(HOLD_PYTHON.format(python=sys.executable))
    wrapper.chmod(0o755)
    hold.touch()
    return hold, {"PYTHON": str(wrapper), "RMT_TEST_PYTHON_HOLD": str(hold), "RMT_TEST_HOLD_COMMAND": command,
                  "RMT_TEST_HOLD_NODE": node}


def _held(hold: Path) -> list[Path]:
    return list(hold.parent.glob(hold.name + ".*"))


def _batch_shell(job_id: str) -> int:
    """PID of the job's batch shell: the process running its script (slurm_script) whose parent is a
    slurmstepd (a subshell of the script has the same command line, but the script as its parent)."""
    for pid in _ns_pids("mn-node1"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            parent = Path(f"/proc/{_status(pid)['PPid']}/comm").read_text().strip()
        except OSError:
            continue
        if b"slurm_script" in cmd and f"SLURM_JOB_ID={job_id}".encode() in env and parent == "slurmstepd":
            return pid
    raise AssertionError(f"no batch shell of job {job_id} on node1")


def test_one_node_four_ranks_early_signals_then_same_weights_as_two_nodes(two_nodes, mn_env, tiny_shards,
                                                                          tmp_path_factory):
    """One job (1 node x 4 ranks) signalled at each early moment of a start, then left to finish:
    start 1: USR1 during the batch script's first command (before common.sh's trap): requeued;
    start 2: USR1 during preflight: requeued at once, nothing to save;
    start 3: USR1 while the train tasks are held before Python starts (their USR1 ignored, as while
    Python imports; the copy srun forwards is discarded): the trainer finds the shell's stop-request
    file once its handler is in: checkpoint, exit 75, requeued;
    start 4 resumes and finishes with the 2-node run's weights (4 ranks on one host vs two hosts).
    Each USR1 is sent with kill(2) to the batch shell, the call slurmstepd makes for `--signal=B:USR1`:
    kill returns with the signal pending, so it lands in the moment under test however loaded the box
    (scancel's delivery is asynchronous; the 2-node preemption test uses it)."""
    tmp = tmp_path_factory.mktemp("mn")
    hold, held = tmp / "hold", tmp / "hold.held"
    hold.touch()
    (tmp / "bin").mkdir()
    (tmp / "bin" / "scontrol").write_text(HOLD_SCONTROL.format(real=shutil.which("scontrol")))
    (tmp / "bin" / "scontrol").chmod(0o755)
    train_hold, python_vars = _python_hold(tmp, "train")  # starts 1 and 2 never run the trainer
    job_id, run_dir = _submit(mn_env, tmp, "early", tiny_shards, nodes=1, tasks_per_node=4,
                              sbatch_args=["--nodelist=node1"], PATH=f"{tmp / 'bin'}:{os.environ['PATH']}",
                              RMT_TEST_HOLD=str(hold), **python_vars)

    def usr1():
        os.kill(_batch_shell(job_id), signal.SIGUSR1)

    _wait(mn_env, job_id, run_dir, until=lambda j: held.exists())
    usr1()  # pending now: the shell handles it before its first command returns
    hold.unlink()
    _wait(mn_env, job_id, run_dir, until=lambda j: "start 2 (" in _log(run_dir, job_id)
          and bool(_processes("mn-node1", b"preflight")))
    usr1()
    _wait(mn_env, job_id, run_dir, until=lambda j: len(_held(train_hold)) == 4)
    wrapper = os.fsencode(python_vars["PYTHON"])
    tasks = [pid for pid in _processes("mn-node1", wrapper)  # the held tasks, not srun (whose args name it)
             if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:2] == [wrapper]]
    assert [_usr1(pid) for pid in tasks] == ["ignored"] * 4, tasks  # the copy srun forwards is discarded
    usr1()
    request = run_dir / "logs" / f"stop-requested-{job_id}"
    _wait(mn_env, job_id, run_dir, until=lambda j: request.exists())
    train_hold.unlink()  # the trainers start: only the file can tell them
    job = _wait(mn_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "3"), log
    starts = re.split(r"start \d \(requeued", log)
    assert len(starts) == 5, log
    for start in starts[1:3]:  # the first two: requeued, no trainer started
        assert "SIGUSR1 before training started: requeuing job" in start, start
        assert not re.search(r"^\d+: global batch", start, re.M), start
    assert "preflight:" not in starts[1] and "0: preflight: 4 ranks ok" in starts[2], log  # 1: skipped
    assert "0: a stop was requested before the trainer could take signals" in starts[3], starts[3]
    assert "training stopped after saving a checkpoint (exit 75): requeuing job" in starts[3], starts[3]
    ends = [(m["reason"], m["step"]) for m in _metrics(run_dir) if m["kind"] == "end"]
    assert [reason for reason, _ in ends] == ["signal", "finished"] and ends[0][1] < MAX_STEPS, ends
    assert {host for host, _ in _preflight_hosts(starts[4]).values()} == {"node1"}, starts[4]
    differ, largest = _compare(_final_state(two_nodes[1]), _final_state(run_dir))
    print(f"1 node x 4 ranks vs 2 nodes x 2: {len(differ)} tensors differ, largest difference {largest:g}")
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


def _slurm_view(env, job_id: str) -> tuple[dict[str, str], str]:
    """The job's record and `sinfo -N` (node, state, reason) as one line."""
    nodes = subprocess.run(["sinfo", "-N", "-h", "-o", "%N %T %E"], env=env, capture_output=True,
                           text=True).stdout
    return _job(env, job_id), " | ".join(nodes.strip().splitlines())


def _trace(run_dir: Path) -> dict[int, list[dict]]:
    """rank -> its data.trace lines, in the order written."""
    return {int(p.stem.split("_")[1]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((run_dir / "trace").glob("rank_*.jsonl"))}


def _samples(lines: dict[int, list[dict]], after: int, upto: int) -> dict[int, list[tuple[int, int]]]:
    """step -> the (index, repeat) pairs all ranks trained at that step, after < step <= upto, sorted."""
    steps: dict[int, list] = {}
    for rank_lines in lines.values():
        for line in rank_lines:
            if after < line["step"] <= upto:
                steps.setdefault(line["step"], []).extend(map(tuple, line["samples"]))
    return {step: sorted(samples) for step, samples in steps.items()}


def _new_lines(before: dict[int, list], now: dict[int, list]) -> dict[int, list]:
    return {rank: lines[len(before.get(rank, [])):] for rank, lines in now.items()}


def _lose_node2(env, tmp, run_dir, shards, how: str, since_tag: int) -> tuple[int, list[str]]:
    """A 2-node job on run_dir; node2 lost (`how`) once a checkpoint after `since_tag` exists; returns
    the last complete checkpoint's step and the survivors' error lines (asserted to come in time).
    SLURM's view is then checked: node2 `down* Not responding`, the job requeued by SLURM (PENDING,
    Restarts=1; slurmctld's log says why), the run's job completion record NODE_FAIL."""
    job_id, _ = _submit(env, tmp, f"lost_{how}", shards, nodes=2, tasks_per_node=2, run_dir=run_dir,
                        overrides=LOST_RUN)

    def checkpointed(job):
        latest = run_dir / "checkpoints" / "latest"
        return job["JobState"] == "RUNNING" and latest.exists() and int(latest.read_text()[5:]) > since_tag

    records_before = len(_metrics(run_dir))
    job = _wait(env, job_id, run_dir, until=checkpointed)
    assert job["JobState"] == "RUNNING", _log(run_dir, job_id)
    (_kill_node if how == "killed" else _cut_link)("node2")
    t_lost, lost_step = time.monotonic(), _train_steps(run_dir)[-1]
    try:
        # The survivors (ranks 0, 1 on node1) end by themselves; the ranks' own output says why.
        ended, log = r"^[01]: error: .*$", _log(run_dir, job_id)
        while time.monotonic() < t_lost + 3 * COLLECTIVE_TIMEOUT_S and not re.search(ended, log, re.M):
            time.sleep(0.5)
            log = _log(run_dir, job_id)
        waited, errors = time.monotonic() - t_lost, re.findall(ended, log, re.M)
        times = [m["time"] for m in _metrics(run_dir)[records_before:]]
        gap = max(b - a for a, b in zip(times, times[1:], strict=False))
        print(f"node2 {how} after step {lost_step}: survivors ended after {waited:.1f} s: {errors[:1]}; "
              f"longest gap between metrics records before: {gap:.1f} s")
        assert errors, f"no error from the ranks on node1 within {3 * COLLECTIVE_TIMEOUT_S} s:\n{log}"
        assert waited < COLLECTIVE_TIMEOUT_S + 10, errors
        # SLURM's view, as launch/README.md describes it: node2 down, the job requeued by SLURM itself
        job = _wait(env, job_id, run_dir, until=lambda j: j["JobState"] in ("PENDING", *FINAL_STATES))
        job, nodes = _slurm_view(env, job_id)
        print(f"SLURM {time.monotonic() - t_lost:.0f} s after the loss: job {job['JobState']} "
              f"({job.get('Reason')}) restarts {job['Restarts']}; nodes: {nodes}")
        assert (job["JobState"], job["Restarts"]) == ("PENDING", "1"), job
        assert re.search(r"node2 down\S* Not responding", nodes), nodes
        ctl_log = (Path(MN_DIR) / "ctl" / "slurmctld.log").read_text()
        assert f"requeue job JobId={job_id} due to failure of node node2" in ctl_log
        runs = [line for line in (Path(MN_DIR) / "ctl" / "jobcomp.log").read_text().splitlines()
                if line.startswith(f"JobId={job_id} ")]  # the job completion record of each run that ended
        assert len(runs) == 1 and "JobState=NODE_FAIL" in runs[0] and "NodeList=node[1-2]" in runs[0], runs
        subprocess.run(["scancel", job_id], env=env)
        _wait(env, job_id, run_dir)
    finally:
        _start(env)  # bring node2 back: link up, slurmd restarted, node resumed
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert len(list((run_dir / "checkpoints" / tag).glob("*zero_pp_rank_*optim_states.pt"))) == 4
    assert since_tag < int(tag[5:]) <= lost_step, (tag, lost_step)
    return int(tag[5:]), errors


LOST_RUN = ["train.max_steps=400", f"train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
            "checkpoint.every_steps=4"]


def test_lost_node_cut_then_killed_then_one_node_trains_the_same_samples(two_nodes, mn_env, tiny_shards,
                                                                         tmp_path_factory):
    """node2's link is cut (the survivors' watchdog names the silent peers), the same RUN_DIR resumes on
    2 nodes, node2 is killed (gloo names its address), each time SLURM downs node2 and requeues the job
    (NODE_FAIL); then `sbatch --nodes=1` resumes through the
    universal checkpoint at the same global batch (2 ranks x 2 micro-batch x 2 accumulation) and
    finishes: the samples of each step, over the three runs, are the uninterrupted run's."""
    tmp = tmp_path_factory.mktemp("mn")
    run_dir = tmp / "lost"
    tag_cut, errors = _lose_node2(mn_env, tmp, run_dir, tiny_shards, "link_cut", since_tag=0)
    hung = r"step \d+ .*did not finish.*lost peer\(s\): rank [23] on node2"
    assert any(re.search(hung, e) for e in errors), errors
    assert not any(re.search(r"rank [01] on node1 \(silent", e) for e in errors), errors  # node1 beat on
    trace_cut = _trace(run_dir)
    tag_kill, errors = _lose_node2(mn_env, tmp, run_dir, tiny_shards, "killed", since_tag=tag_cut)
    assert any(re.search(rf"lost a peer at step \d+ .*{NODE_IP['node2']}", e) for e in errors), errors
    trace_kill = _trace(run_dir)

    resume = [*LOST_RUN, f"train.max_steps={MAX_STEPS}", "train.max_batch_per_device=2"]
    job_id, _ = _submit(mn_env, tmp, "lost_resume", tiny_shards, nodes=1, tasks_per_node=2,
                        overrides=resume, run_dir=run_dir)
    job = _wait(mn_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert f"resume from: {run_dir}/checkpoints/step_{tag_kill:08d}" in log, log
    assert f"resuming step_{tag_kill:08d} (world size 4, ZeRO-2) at world size 2, ZeRO-2: converting to a " \
        "universal checkpoint" in log, log
    assert f"batch: global batch {GLOBAL_BATCH} = 2 ranks x 2 micro-batch x 2 accumulation" in log, log
    assert _metrics(run_dir)[-1]["reason"] == "finished"

    reference = _samples(_trace(two_nodes[1]), 0, MAX_STEPS)
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    assert all(len(samples) == GLOBAL_BATCH for samples in reference.values()), reference
    trained = {**_samples(trace_cut, 0, tag_cut),
               **_samples(_new_lines(trace_cut, trace_kill), tag_cut, tag_kill),
               **_samples(_new_lines(trace_kill, _trace(run_dir)), tag_kill, MAX_STEPS)}
    print(f"samples: steps 1-{tag_cut} on 2 nodes, {tag_cut + 1}-{tag_kill} on 2 nodes, "
          f"{tag_kill + 1}-{MAX_STEPS} on 1 node")
    assert trained == reference, {s: (trained.get(s), reference[s]) for s in reference
                                  if trained.get(s) != reference[s]}


def _log_until(run_dir: Path, job_id: str, pattern: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = _log(run_dir, job_id)
        if re.search(pattern, log, re.M):
            return log
        time.sleep(0.3)
    return _log(run_dir, job_id)


PREFLIGHT_TIMEOUT_S = 20


def test_preflight_fails_the_job_when_a_node_cannot_reach_rank_0(mn_env, tiny_shards, tmp_path_factory):
    """node2 loses its route to node1 as its preflight starts (its tasks held until the route is gone):
    the job fails naming node2, no training."""
    tmp = tmp_path_factory.mktemp("mn")
    t0 = time.monotonic()
    hold, python_vars = _python_hold(tmp, "preflight", node="node2")
    job_id, run_dir = _submit(mn_env, tmp, "unreachable", tiny_shards, nodes=2, tasks_per_node=2,
                              PREFLIGHT_TIMEOUT=str(PREFLIGHT_TIMEOUT_S), **python_vars)
    _wait(mn_env, job_id, run_dir, until=lambda j: len(_held(hold)) == 2)  # node2's two, before Python
    route = ["ip", "-n", "mn-node2", "route", "add", "blackhole", f"{NODE_IP['node1']}/32"]
    subprocess.run(route, check=True)
    hold.unlink()
    try:
        _log_until(run_dir, job_id, r"^0: error: preflight", 3 * PREFLIGHT_TIMEOUT_S)
        failed_after = time.monotonic() - t0
    finally:
        subprocess.run([*route[:4], "del", *route[5:]], check=True)
    job = _wait(mn_env, job_id, run_dir)
    log = _log(run_dir, job_id)
    print(f"unreachable node2: rank 0's error {failed_after:.1f} s after submit; job {job['JobState']} "
          f"{job['ExitCode']} after {time.monotonic() - t0:.1f} s")
    assert "0: error: preflight: ranks [2, 3] (on node2) did not check in" in log, log
    assert "hosts that did: node1" in log, log
    # the job's code is 1; srun's is the highest of its tasks': 1, or 143 for the ranks it had to end
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "1:0", "0"), log
    assert re.search(r"preflight FAILED \(srun exit (1|143)\); NOT training, NOT requeued \(job exit 1\)",
                     log), log
    assert not _metrics(run_dir), "training started"
