"""Token labeling end to end: a 2-process ZeRO-2 `train.loss=token_label` run (a tiny token-labeling RMT,
MixToken on a 3 x 3 token grid, label maps in the shards) killed with SIGKILL mid-epoch and resumed is
bit-identical to an uninterrupted run (model, optimizer, EMA, loader state), in both shard formats."""

from __future__ import annotations

import os
import random

import pytest

from tests.conftest import Trainer
from tests.test_loader_label_maps import label_map_shards
from tests.test_train import check, differences, evals, kill_when, latest, metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TL_DATA = {"img_size": 96, "eval_img_size": 96, "mixup": 0.0, "cutmix": 0.0, "repeated_aug": 1,
           "interpolation": "random"}  # the starred recipe's data settings


@pytest.fixture(scope="module")
def tl_trainer(tmp_path_factory):
    """A `Trainer` over shards with label maps (4 classes x 16 train, both formats) for a tiny RMT-T
    with `token_label` (aux head, MixToken)."""
    base = tmp_path_factory.mktemp("tl_train")
    out, _ = label_map_shards(base, train_per_class=16, val_per_class=4)
    (base / "runs").mkdir()
    trainer = Trainer(base / "runs", out)
    trainer.MODEL = {**Trainer.MODEL, "kwargs": {**Trainer.MODEL["kwargs"], "token_label": True}}
    return trainer


def tl_config(trainer, name: str, fmt: str, **data):
    return trainer.config(name, data={**TL_DATA, "format": fmt, **data},
                          train={"epochs": 2, "loss": "token_label"},
                          ema={"decay": 0.9, "scale_with_batch": False},
                          metrics={"log_every": 1, "tensorboard": False, "progress": "lines"})


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_token_label_run_resumes_exactly_after_sigkill(tl_trainer, tmp_path, fmt):
    ref_config, ref_run = tl_config(tl_trainer, f"reference_{fmt}", fmt)
    check(tl_trainer.run(ref_config))
    losses = [m["loss"] for m in metrics(ref_run) if m["kind"] == "train"]
    assert len(losses) == 16 and all(loss > 0 for loss in losses)
    config, run = tl_config(tl_trainer, f"killed_{fmt}", fmt, workers=2)
    kill_at = random.Random(os.getpid()).randint(5, 12)  # 16 steps; checkpoints every 4
    with open(tmp_path / "killed.log", "w") as log:
        kill_when(tl_trainer.start(config, log=log), tmp_path / "killed.log",
                  lambda: any(m.get("step", 0) >= kill_at for m in metrics(run) if m["kind"] == "train"))
    killed_at = max(m["step"] for m in metrics(run) if m["kind"] == "train")
    assert killed_at < 16
    check(tl_trainer.run(config))
    assert latest(run) == latest(ref_run) == "step_00000016"
    # as in test_train.py's SIGKILL test: torch's global RNG state is not training state (the loop
    # reseeds torch before every step); the evaluations are equal too
    diffs = differences(ref_run / "checkpoints" / latest(ref_run), run / "checkpoints" / latest(run),
                        ignore=("/rng/torch",))
    assert diffs == [], f"killed at step {killed_at}: {diffs[:10]}"
    assert len(evals(run)) == 2 and evals(run) == evals(ref_run)
    ref_loss = {m["step"]: m["loss"] for m in metrics(ref_run) if m["kind"] == "train"}
    loss = {m["step"]: m["loss"] for m in metrics(run) if m["kind"] == "train"}  # later lines win
    assert loss == ref_loss
