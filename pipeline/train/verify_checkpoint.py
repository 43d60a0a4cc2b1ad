"""The `verify-checkpoint` command: check every checkpoint of a run (or one checkpoint) without loading it.

    python -m pipeline verify-checkpoint RUN_DIR|CHECKPOINT_DIR

One line per checkpoint: `ok` or what is wrong (missing, truncated or damaged files, an unfinished
save). Exit 0 when the newest checkpoint is verified (so a resume would use it), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.errors import InputError
from pipeline.train import checkpoint_verify as verify
from pipeline.train.run_dir import RunDir

TAG_PREFIX = "step_"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a run dir (all its checkpoints) or one checkpoints/step_* dir")


def _tag_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        raise InputError(f"'{path}' is not a directory: pass a run dir or a checkpoints/step_* dir")
    if path.name.startswith(TAG_PREFIX):
        return [path]
    ckpt_dir = RunDir(path).checkpoints if RunDir(path).is_run_dir() else path
    dirs = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
                  and not p.name.endswith("_universal"))
    if not dirs:
        raise InputError(f"'{path}' has no checkpoints (no checkpoints/step_* dirs)")
    return dirs


def run(args: argparse.Namespace) -> int:
    dirs = _tag_dirs(Path(args.path))
    newest_ok = False
    for tag_dir in dirs:
        meta, _ = verify.read_meta(tag_dir)
        found = verify.problems(tag_dir)
        size = sum(r["size"] for r in (meta or {}).get("files", {}).values())
        print(json.dumps({"checkpoint": str(tag_dir), "ok": not found, "bytes": size, "problems": found}))
        if "." not in tag_dir.name:  # set-aside dirs (.damaged, .replaced) do not count as the newest
            newest_ok = not found
    return 0 if newest_ok else 1
