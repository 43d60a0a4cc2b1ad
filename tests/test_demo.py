"""`python -m pipeline demo` end to end at a tiny size: fake ImageNet -> shards -> 2 CPU processes through
launch/local.sh -> SIGTERM mid-epoch -> resume -> eval, export, report; and its early errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "model.kwargs={embed_dims: [16, 32, 64, 64], depths: [1, 1, 1, 1], num_heads: [2, 2, 4, 4], "
    "projection: 64}",
    "data.img_size=32", "data.eval_img_size=32", "data.workers=0", "train.global_batch=8",
    "train.max_batch_per_device=4", "train.epochs=3",
    "checkpoint.every_steps=4", "metrics.log_every=1", "metrics.tensorboard=false", "optim.lr_base_batch=8",
]


def demo(tmp_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", "demo", "--data", str(tmp_path / "data"),
           "--shards", str(tmp_path / "shards"), "--run-dir", str(tmp_path / "run"), *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_trains_interrupts_resumes_and_reports(tmp_path):
    fmt = "ffcv"  # `make demo`'s default, wds, is the format the other trainer tests use most
    import timm
    from safetensors.torch import load_file

    import pipeline.models  # noqa: F401

    proc = demo(tmp_path, "--format", fmt, "--classes", "4", "--train-per-class", "16",
                "--val-per-class", "4", "--max-side", "64", "--min-top1", "0", *TINY)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in records if r["kind"] == "end"]
    assert [e["reason"] for e in ends] == ["signal", "finished"]
    spe = 16 * 4 // (4 * 2)  # train images / global batch
    assert ends[0]["step"] % spe != 0, "the SIGTERM was meant to land in the middle of an epoch"
    assert ends[1]["step"] == 3 * spe
    assert f"resume from: {run}/checkpoints/step_{ends[0]['step']:08d}" in out
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2, 3] and all("ema_top1" in e for e in evals)
    assert (run / "config.yaml").read_text().count(f"format: {fmt}") == 1

    for name in ("rmt_t_demo.safetensors", "rmt_t_demo_ema.safetensors"):
        model = timm.create_model("rmt_t", num_classes=4, embed_dims=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                                  num_heads=[2, 2, 4, 4], projection=64)
        model.load_state_dict(load_file(str(run / "export" / name)))
    for name in ("loss.png", "lr.png", "accuracy.png", "throughput.png", "summary.md"):
        assert (run / "report" / name).is_file()
    summary = out[out.index("demo summary"):]
    assert f"interrupted by SIGTERM at step {ends[0]['step']}" in summary
    assert str(run / "export" / "rmt_t_demo_ema.safetensors") in summary
    # the summary's accuracies are those of `eval` on the exported run
    evaluated = [json.loads(line) for line in out.splitlines() if line.startswith('{"checkpoint"')]
    assert [e["ema"] for e in evaluated] == [False, True]
    assert f"model  {evaluated[0]['top1']:6.2f} / {evaluated[0]['top5']:6.2f}" in summary
    assert evaluated[0]["count"] == 16


def test_config_errors_come_before_any_work(tmp_path):
    proc = demo(tmp_path, "train.epochs=1", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: the demo stops training in the middle of an epoch after the first evaluation: it needs "
        "train.epochs >= 2, train.eval_every_epochs=1 and train.max_steps=0"]
    assert not (tmp_path / "data").exists()
    proc = demo(tmp_path, "train.epochz=3", timeout=60)
    assert proc.returncode == 2 and "unknown config key 'train.epochz'" in proc.stderr


def test_refuses_to_delete_folders_it_did_not_write(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "precious.txt").write_text("keep me")
    proc = demo(tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: --shards {tmp_path / 'shards'} exists and was not written by the "
                                   "demo (no manifest.json): pass another --shards")
    assert (tmp_path / "shards" / "precious.txt").read_text() == "keep me"
