"""Checkpoint integrity: the size and sha256 of every file of a checkpoint, recorded and verified.

`meta.json` is written last (the "complete" mark) and lists every file of the checkpoint directory
with its size and sha256 (`files`). A checkpoint is *verified* when meta.json parses, names its own
tag, and every listed file exists with that size and digest. sha256 runs at about 1.3 GB/s per core
here (SHA-NI); each rank hashes a share of the files, so a save costs about size / (ranks x 1.3 GB/s)
more (see BENCHMARKS.md "Checkpoint verification").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

META = "meta.json"
CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(tag_dir: Path) -> list[str]:
    """Every file of the checkpoint (relative paths, sorted), meta.json and temporaries excluded."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != META and not p.name.startswith("."))


def file_records(tag_dir: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"size": (tag_dir / n).stat().st_size, "sha256": sha256_file(tag_dir / n)} for n in names}


def read_meta(tag_dir: Path) -> tuple[dict | None, str | None]:
    """(meta, None) or (None, what is wrong with meta.json)."""
    path = tag_dir / META
    if not path.is_file():
        return None, f"no {META} (the save did not finish)"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{META} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    if not isinstance(meta, dict) or meta.get("tag") != tag_dir.name:
        named = meta.get("tag") if isinstance(meta, dict) else meta
        return None, f"{META} does not describe this checkpoint (tag {named!r})"
    return meta, None


def problems(tag_dir: Path, names: list[str] | None = None) -> list[str]:
    """What is wrong with checkpoint `tag_dir` (empty when verified); `names` limits the files checked."""
    meta, err = read_meta(tag_dir)
    if err:
        return [err]
    records = meta.get("files")
    if not isinstance(records, dict):
        return [f"{META} lists no files (made before checkpoints were verified): cannot verify it"]
    found = []
    for name in sorted(records) if names is None else names:
        rec, path = records.get(name), tag_dir / name
        if rec is None:
            found.append(f"{name} is not listed in {META}")
        elif not path.is_file():
            found.append(f"{name} is missing")
        elif path.stat().st_size != rec["size"]:
            found.append(f"{name} has {path.stat().st_size} bytes, {rec['size']} were written")
        elif sha256_file(path) != rec["sha256"]:
            found.append(f"{name} is damaged (sha256 differs from the one written)")
    return found
