"""The layout of a run dir (a training run's `output_dir`): every file and folder in it is named here.

    config.yaml       this start's resolved config (rank 0, at every accepted start)
    config_history/   every start's config, NNN-<resumed tag or fresh>.yaml
    metrics.jsonl     train/eval/end records (rank 0, appended across resumes)
    tensorboard/      TensorBoard scalars (metrics.tensorboard)
    trace/            per-rank sample trace (data.trace)
    checkpoints/      step_XXXXXXXX/ tags and `latest` (see checkpoint.py)
    run.lock          the live run's lock (run_lock.py)
    superseded/       earlier runs set aside by checkpoint.start_over=move
    logs/             the launchers' logs
    report/           the `report` command's default output
    export/           the demo's exported weights (`export --out` takes any path)

The launchers ask for paths with `python -m pipeline run-dir RUN_DIR PART` (imports no torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

LATEST = "latest"
CONFIG_FILE = "config.yaml"
LOCK_FILE = "run.lock"
# what checkpoint.start_over (move / delete) takes away from a run dir, besides the checkpoints
RUN_RECORDS = ("metrics.jsonl", "tensorboard", CONFIG_FILE, "config_history")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / CONFIG_FILE)
    config_history = property(lambda self: self.root / "config_history")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    trace = property(lambda self: self.root / "trace")
    checkpoints = property(lambda self: self.root / "checkpoints")
    latest = property(lambda self: self.checkpoints / LATEST)
    lock = property(lambda self: self.root / LOCK_FILE)
    superseded = property(lambda self: self.root / "superseded")
    logs = property(lambda self: self.root / "logs")
    report = property(lambda self: self.root / "report")
    export = property(lambda self: self.root / "export")

    def is_run_dir(self) -> bool:
        return self.checkpoints.is_dir()

    def resume_point(self) -> Path | None:
        """The checkpoint `latest` names (complete or not: see checkpoint.read_latest), or None."""
        tag = self.latest.read_text().strip() if self.latest.is_file() else ""
        return self.checkpoints / tag if tag else None


PARTS = ("config", "metrics", "tensorboard", "checkpoints", "latest", "logs", "report", "resume-point")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run's output_dir")
    parser.add_argument("part", choices=PARTS,
                        help="the path to print (resume-point: the checkpoint `latest` names, '' if none)")


def run(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    if args.part == "resume-point":
        print(run_dir.resume_point() or "")
    else:
        print(getattr(run_dir, args.part))
    return 0
