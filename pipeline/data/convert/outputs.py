"""Output files of the `shards` command: written under a temporary name, fsynced, hashed, renamed.

Also the resume records (`finished` says whether a file from an earlier run can be kept) and the
plan of an output file (`Output`, `plan_hash`), which the format writers share.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


class HashingFile:
    """A file opened for writing under a temporary name, hashed as written; `commit()` renames it."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        try:
            self.file.close()  # flushing may fail again (disk full): the file goes anyway
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    """Atomically write `obj` as UTF-8 JSON with sorted keys and indent 2."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def finished(out: Path, rel: str, plan: str) -> dict | None:
    """The record of `rel` if that file is complete for `plan` and its bytes still match."""
    record_path = out / ".state" / (Path(rel).name + ".json")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    path = out / rel
    if record.get("plan") != plan or not path.is_file() or path.stat().st_size != record.get("bytes"):
        return None
    return record if sha256_file(path) == record.get("sha256") else None


@dataclass(frozen=True)
class Output:
    """One output file of a split: its name, the samples it holds (`order[lo:hi]`) and its plan hash."""

    name: str
    lo: int
    hi: int
    plan: str  # hash of what determines the file's bytes


def plan_hash(entries, opts: dict) -> str:
    """The hash of the options and input files (`InputFile`s) that determine an output file's bytes."""
    h = hashlib.sha256(json.dumps(opts, sort_keys=True).encode())
    for e in entries:
        h.update(f"{e.key}\t{e.label}\t{e.size}\t{e.path}\n".encode())
    return h.hexdigest()
