"""The run lock: one training run at a time per output_dir, and a clear takeover rule for restarts.

`<output_dir>/run.lock` holds the holder's host, pid, SLURM job id and start time as JSON, and its
mtime is the holder's heartbeat (rank 0 touches it every `heartbeat_s`). A new run takes the lock if
it is free, or if the holder is provably gone:

- the holder is this SLURM job (a requeued or restarted job reuses its job id), or
- the holder ran on this host and its pid is no longer alive (a crash, a SIGKILL), or
- the heartbeat is older than `stale_after_s` (a holder on another host that died: its process
  cannot be checked from here, so only silence counts; this works on NFS and Lustre, where
  `flock` may be a no-op, since it needs only O_EXCL create, rename and mtime).

Otherwise it fails at once naming the holder. Two runs racing for a stale lock: both rename their
own record into place, and the one whose record is not there after the rename gives up.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from pipeline.errors import InputError
from pipeline.train.run_dir import LOCK_FILE

LOCK_NAME = LOCK_FILE


class RunLockedError(InputError):
    """Another live run holds the output_dir."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "started": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}"


class RunLock:
    """Held by rank 0 for the whole run; `acquire()` raises RunLockedError naming a live holder."""

    def __init__(self, output_dir: str | Path, stale_after_s: float = 300.0, heartbeat_s: float = 30.0):
        self.path = Path(output_dir) / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.record = _me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None  # the stale holder replaced, for the start-up message

    def _why_stale(self, holder: dict) -> str | None:
        """Why `holder` is gone (a reason string), or None if it may be alive."""
        me = self.record
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]:
            return "the same SLURM job (requeued or restarted)"
        if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return "its process is gone"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {"host": "?", "pid": -1}  # unreadable: treated as foreign, stale only by its mtime

    def acquire(self) -> None:
        text = json.dumps(self.record)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._read()
            reason = self._why_stale(holder)
            if reason is None:
                raise RunLockedError(
                    f"output_dir {self.path.parent} is in use by another run ({describe(holder)}; lock "
                    f"{self.path}): wait for it, stop it, or use another output_dir. If that run is dead, "
                    f"the lock is taken over {self.stale_after_s:.0f} s after its last heartbeat") from None
            tmp = self.path.with_name(f".{LOCK_NAME}.{self.record['host']}.{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, self.path)
            if not self._is_mine():
                raise RunLockedError(f"output_dir {self.path.parent}: another run took over the stale lock "
                                     f"at the same moment ({describe(self._read())})") from None
            self.took_over = {**holder, "reason": reason}
        else:
            with os.fdopen(fd, "w") as f:
                f.write(text)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a lost lock file shows at the next start, not as a crash of this run

    def release(self) -> None:
        self._stop.set()
        if self._is_mine():
            self.path.unlink(missing_ok=True)

    def _is_mine(self) -> bool:
        holder = self._read()
        return holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
