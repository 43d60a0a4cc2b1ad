"""Run metrics (rank 0 only): metrics.jsonl lines, TensorBoard scalars, a progress bar or plain lines."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from pipeline.train.run_dir import RunDir


def max_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def mfu(images_per_s: float, flops_per_image_fwd: float, world_size: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: 3x forward FLOPs per trained image over the devices' peak."""
    if not flops_per_image_fwd or peak_tflops <= 0:
        return 0.0
    return 3.0 * flops_per_image_fwd * images_per_s / (peak_tflops * 1e12 * world_size)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsWriter:
    """Writes on rank 0, does nothing elsewhere. `progress`: auto | bar | lines."""

    def __init__(self, output_dir: Path, rank: int, tensorboard: bool, progress: str, total_steps: int,
                 start_step: int):
        self.enabled = rank == 0
        self.file = None
        self.tb = None
        self.bar = None
        if not self.enabled:
            return
        self.file = open(RunDir(output_dir).metrics, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(RunDir(output_dir).tensorboard), purge_step=start_step or None)
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps or None, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", time.time())
        self.file.write(json.dumps(record) + "\n")
        kind = record.get("kind")
        if self.tb is not None and kind in ("train", "eval"):
            for k, v in record.items():
                if k not in ("kind", "step", "epoch", "time") and isinstance(v, int | float):
                    self.tb.add_scalar(f"{kind}/{k}", v, record["step"])
        if kind == "train" and self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 ips=f"{record['images_per_s']:.0f}")
        elif kind in ("train", "eval", "end"):
            fields = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in record.items() if k not in ("kind", "time"))
            self._print(f"[{kind}] {fields}")

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


class BestSoFar:
    """Best-so-far top-1 of the model and of the EMA with their epochs, and the paper's number.

    RMT's reported top-1 is the best over all epochs of max(model, EMA) (e.g. RMT-S: EMA 84.10 at epoch
    261, 83.95 at the end). The state travels in the checkpoint, so a resumed run keeps its bests.
    """

    def __init__(self):
        self.state: dict = {}

    def update(self, epoch: int, res: dict) -> dict:
        """Fold in the evaluation after `epoch`; returns the fields its eval record gets."""
        for key in ("top1", "ema_top1"):
            if key in res and math.isfinite(res[key]) and res[key] > self.state.get(f"best_{key}", -1.0):
                self.state[f"best_{key}"], self.state[f"best_{key}_epoch"] = res[key], epoch
        candidates = [(self.state[f"best_{k}"], self.state[f"best_{k}_epoch"], w)
                      for k, w in (("top1", "model"), ("ema_top1", "EMA")) if f"best_{k}" in self.state]
        if candidates:
            top1, at, weights = max(candidates, key=lambda c: c[0])
            self.state.update({"paper_top1": top1, "paper_top1_epoch": at, "paper_top1_weights": weights})
        return dict(self.state)
