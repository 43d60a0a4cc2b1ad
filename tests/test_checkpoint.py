"""Checkpoint directory protocol: `latest` names only complete checkpoints, retention, leftovers of a
crashed save, and resuming with an incompatible config."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.train.checkpoint import prune, read_latest, tag_for


def make(ckpt, step, complete=True):
    d = ckpt / tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / "meta.json").write_text(json.dumps({"step": step}))
    return d


def test_latest_must_name_a_complete_checkpoint(tmp_path):
    assert read_latest(tmp_path) is None
    make(tmp_path, 4)
    (tmp_path / "latest").write_text("step_00000004\n")
    assert read_latest(tmp_path) == "step_00000004"
    make(tmp_path, 8, complete=False)
    (tmp_path / "latest").write_text("step_00000008\n")
    assert read_latest(tmp_path) is None  # never resume from a half-written checkpoint


def test_prune_keeps_the_newest_complete_and_a_save_in_flight(tmp_path):
    for step in (4, 8, 12, 16):
        make(tmp_path, step)
    make(tmp_path, 6, complete=False)  # leftover of a crashed save
    make(tmp_path, 20, complete=False)  # a newer save still being written
    (tmp_path / "step_00000004_universal").mkdir()
    (tmp_path / "latest").write_text("step_00000016\n")
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step_00000012", "step_00000016", "step_00000020"]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_crashed_save_and_an_incompatible_config(trainer, reference_run, tmp_path):
    config, ref = reference_run
    run = tmp_path / "copy"
    shutil.copytree(ref, run)
    make(run / "checkpoints", 28, complete=False)  # a save that crashed half-way
    assert read_latest(run / "checkpoints") == "step_00000024"
    proc = trainer.run(config, nproc=1, overrides=[f"output_dir={run}", "model.num_classes=5"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint") and "model.num_classes" in err
    # a change that does not alter what the weights mean resumes (and, finished, exits at once)
    proc = trainer.run(config, nproc=1, overrides=[f"output_dir={run}", "metrics.log_every=7",
                                                   "checkpoint.every_steps=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
