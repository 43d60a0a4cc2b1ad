"""The run lock: a live holder is named and refused; a dead one (same host, same SLURM job, silent) is
taken over. Holders are real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.train.run_lock import LOCK_NAME, RunLock, RunLockedError

HOLD = ("import sys, time\nfrom pipeline.train.run_lock import RunLock\n"
        "lock = RunLock(sys.argv[1], heartbeat_s=0.2)\nlock.acquire()\nprint('held', flush=True)\n"
        "time.sleep(60)\n")


def _holder(tmp_path, env=None):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_is_refused_naming_the_holder(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    proc = _holder(tmp_path, {"SLURM_JOB_ID": "4242"})
    try:
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and "SLURM job 4242" in msg
        assert "\n" not in msg
    finally:
        proc.kill()
        proc.wait()


def test_crashed_holder_on_this_host_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    proc = _holder(tmp_path)
    proc.kill()
    proc.wait()
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.took_over["pid"] == proc.pid and lock.took_over["reason"] == "its process is gone"
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    proc = _holder(tmp_path, {"SLURM_JOB_ID": "77"})  # still alive: e.g. a task of the job's last run
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        lock = RunLock(tmp_path)
        lock.acquire()
        assert "same SLURM job" in lock.took_over["reason"]
        lock.release()
    finally:
        proc.kill()
        proc.wait()


def test_holder_on_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "slurm_job_id": "", "started": 0}))
    with pytest.raises(RunLockedError, match="node-elsewhere"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    lock = RunLock(tmp_path, stale_after_s=60)
    lock.acquire()
    assert lock.took_over["host"] == "node-elsewhere" and "no heartbeat" in lock.took_over["reason"]
    lock.release()


def test_heartbeat_keeps_a_live_holder_fresh(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    proc = _holder(tmp_path)
    try:
        path = tmp_path / LOCK_NAME
        old = time.time() - 1000
        os.utime(path, (old, old))
        deadline = time.monotonic() + 30  # the holder refreshes it every 0.2 s, however loaded the box
        while path.stat().st_mtime <= old + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert time.time() - path.stat().st_mtime < 30
    finally:
        proc.kill()
        proc.wait()
