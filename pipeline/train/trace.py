"""Opt-in sample trace (`data.trace: true`): which samples each optimizer step trained on, per rank.

One JSON line per optimizer step to output_dir/trace/rank_XXXXX.jsonl:
`{"step", "epoch", "lr", "samples": [[index, repeat], ...]}`, `index` the sample's position in the train
split (manifest order), `repeat` its repeated-augmentation copy. Lines of a step that was redone after a
resume appear again; the last line of a step wins.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.train.run_dir import RunDir


class SampleTrace:
    def __init__(self, output_dir: Path, rank: int):
        folder = RunDir(output_dir).trace
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank_{rank:05d}.jsonl", "a", buffering=1)
        self.record: dict | None = None

    def begin(self, step: int, epoch: int, lr: float) -> None:
        self.record = {"step": step, "epoch": epoch, "lr": lr, "samples": []}

    def add(self, samples) -> None:
        indices, repeats = samples
        self.record["samples"] += [[int(i), int(r)] for i, r in zip(indices, repeats, strict=True)]

    def end(self) -> None:
        self.file.write(json.dumps(self.record) + "\n")
        self.record = None
