"""`python -m pipeline demo` end to end at a tiny size: fake ImageNet -> shards -> 2 CPU processes through
launch/local.sh -> SIGTERM mid-epoch -> resume -> eval, export, report; the token-labeling demo on top of
it (the plain run teaches through label maps); and their early errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo import DemoError, check_learned
from pipeline.errors import EXIT_FAILURE

# A tiny RMT-T at the demo's 64 px on 10 classes x 16 train images, 12 epochs of 20 steps: the smallest
# size tried (on this project's 2-core box) whose plain run teaches the token-labeling run enough to pass the
# demo's own check (top-1 >= 3x chance): plain ~57%, token labeling ~49% (4 classes, 32 px, 3 epochs:
# the teacher stayed at chance).
TINY_MODEL = "embed_dims: [16, 32, 64, 64], depths: [1, 1, 1, 1], num_heads: [2, 2, 4, 4], projection: 64"
TRAIN = ["data.workers=0", "train.global_batch=8", "train.max_batch_per_device=4", "train.epochs=12",
         "checkpoint.every_steps=10", "metrics.log_every=1", "metrics.tensorboard=false", "optim.lr=1e-3",
         "optim.lr_base_batch=8", "ema.decay=0.9"]
TINY = [f"model.kwargs={{{TINY_MODEL}}}", *TRAIN]
# + aux_head: a 2 x 2 token grid; decoded and augmented by the device path (data.decode=device, here on the
# CPU), so the demo runs it end to end: training, the resume, eval through the checkpoint's config
TINY_TL = [f"model.kwargs={{{TINY_MODEL}, token_label: true}}", "data.decode=device", *TRAIN]
DATA = ["--classes", "10", "--train-per-class", "16", "--val-per-class", "8", "--max-side", "64"]
STEPS_PER_EPOCH = 16 * 10 // 8  # train images / global batch


def demo(tmp_path: Path, *args: str, timeout: float = 600, shards: str = "shards",
         run_dir: str = "run") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", "demo", "--data", str(tmp_path / "data"),
           "--shards", str(tmp_path / shards), "--run-dir", str(tmp_path / run_dir), *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plain_demo(tmp_path_factory):
    """The plain demo's folder and process: the first test's subject, the token-labeling test's teacher."""
    base = tmp_path_factory.mktemp("demo")
    return base, demo(base, "--format", "ffcv", *DATA, *TINY)


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_trains_interrupts_resumes_and_reports(plain_demo):
    fmt = "ffcv"  # `make demo`'s default, wds, is the format the other trainer tests use most
    import timm
    from safetensors.torch import load_file

    import pipeline.models  # noqa: F401

    tmp_path, proc = plain_demo
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in records if r["kind"] == "end"]
    assert [e["reason"] for e in ends] == ["signal", "finished"]
    spe = STEPS_PER_EPOCH
    assert ends[0]["step"] % spe != 0, "the SIGTERM was meant to land in the middle of an epoch"
    assert ends[1]["step"] == 12 * spe
    assert f"resume from: {run}/checkpoints/step_{ends[0]['step']:08d}" in out
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["epoch"] for e in evals] == list(range(1, 13)) and all("ema_top1" in e for e in evals)
    assert (run / "config.yaml").read_text().count(f"format: {fmt}") == 1

    for name in ("rmt_t_demo.safetensors", "rmt_t_demo_ema.safetensors"):
        model = timm.create_model("rmt_t", num_classes=10, embed_dims=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                                  num_heads=[2, 2, 4, 4], projection=64)
        model.load_state_dict(load_file(str(run / "export" / name)))
    for name in ("loss.png", "lr.png", "accuracy.png", "throughput.png", "summary.md"):
        assert (run / "report" / name).is_file()
    summary = out[out.index("demo summary"):]
    assert f"interrupted by SIGTERM at step {ends[0]['step']}" in summary
    assert str(run / "export" / "rmt_t_demo_ema.safetensors") in summary
    assert (f"python -m pipeline demo --token-label --format ffcv --teacher {run} --data {tmp_path / 'data'} "
            "--classes 10") in summary  # what the next test runs
    # the summary's accuracies are those of `eval` on the exported run
    evaluated = [json.loads(line) for line in out.splitlines() if line.startswith('{"checkpoint"')]
    assert [e["ema"] for e in evaluated] == [False, True]
    assert f"model  {evaluated[0]['top1']:6.2f} / {evaluated[0]['top5']:6.2f}" in summary
    assert evaluated[0]["count"] == 80 and all(e["top1"] >= 30 for e in evaluated)  # the demo's check


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


@pytest.mark.slow
@pytest.mark.distributed
def test_token_label_demo_learns_from_the_plain_demo_run(plain_demo):
    """`make demo TL=1` on the finished plain demo: label maps from its EMA weights, shards with them, a
    token-labeling RMT-T trained (interrupted, resumed) with the token-labeling loss, evaluated, exported;
    it exits 0 only if model and EMA top-1 reach 3x chance."""
    import timm
    from safetensors.torch import load_file

    import pipeline.models  # noqa: F401

    base, plain = plain_demo
    assert plain.returncode == 0, (plain.stdout + plain.stderr)[-3000:]
    teacher = base / "run"
    proc = demo(base, "--token-label", "--teacher", str(teacher), "--maps", str(base / "maps"), *DATA,
                *TINY_TL, shards="shards-tl", run_dir="run-tl")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "running the plain demo first" not in out  # the finished plain run is the teacher
    assert f"$ python -m pipeline label-maps --teacher {teacher} --ema" in out
    assert f"--labels {base / 'maps'}" in out
    manifest = json.loads((base / "shards-tl" / "manifest.json").read_text())
    assert manifest["options"]["labels"] == str(base / "maps")
    assert manifest["splits"]["train"]["num_samples"] == len(list((base / "maps").rglob("*.pt"))) == 160
    run = base / "run-tl"
    config = (run / "config.yaml").read_text()
    assert "loss: token_label" in config and "token_label: true" in config and "decode: device" in config
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in records if r["kind"] == "end"]
    assert [e["reason"] for e in ends] == ["signal", "finished"] and ends[1]["step"] == 12 * STEPS_PER_EPOCH
    model = timm.create_model("rmt_t", num_classes=10, embed_dims=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                              num_heads=[2, 2, 4, 4], projection=64, token_label=True)
    model.load_state_dict(load_file(str(run / "export" / "rmt_t_demo_ema.safetensors")))
    summary = out[out.index("demo summary"):]
    assert f"teacher {teacher} (EMA top-1 " in summary
    assert f"-> 160 label maps [2, 5, 2, 2] in {base / 'maps'}" in summary
    evaluated = [json.loads(line) for line in out.splitlines() if line.startswith('{"checkpoint"')]
    assert [e["ema"] for e in evaluated] == [False, True] and all(e["top1"] >= 30 for e in evaluated)


def test_token_label_demo_without_a_teacher_runs_the_plain_demo_first(tmp_path):
    """No finished run at --teacher: the plain demo runs first with the same data options (here it refuses
    a folder it did not write, before any work: a failed step of the token-labeling demo, exit 1)."""
    precious = tmp_path / "shards" / "demo" / "precious.txt"  # the plain demo's default --shards
    precious.parent.mkdir(parents=True)
    precious.write_text("keep me")
    proc = demo(tmp_path, "--token-label", "--teacher", str(tmp_path / "teacher"), "--maps",
                str(tmp_path / "maps"), shards="shards-tl", run_dir="run-tl", timeout=120)
    assert proc.returncode == EXIT_FAILURE, proc.stdout + proc.stderr
    teacher = tmp_path / "teacher"
    assert f"no finished plain demo run in {teacher}: running the plain demo first" in proc.stdout
    assert (f"$ python -m pipeline demo --format wds --data {tmp_path / 'data'} --run-dir {teacher} "
            "--classes 10 --train-per-class 40 --val-per-class 10 --max-side 160 --nproc 2") in proc.stdout
    assert proc.stderr.strip().splitlines()[-2:] == [
        f"error: --shards {precious.parent} exists and was not written by the demo (no manifest.json): pass "
        "another --shards",
        "error: the plain demo (the teacher) exited with 2 (expected 0); its output is above"]
    assert precious.read_text() == "keep me"


def test_a_demo_that_did_not_learn_is_a_failure_not_bad_input(tmp_path):
    results = {"model": {"top1": 80.0}, "EMA": {"top1": 20.0}}
    check_learned(results, 20.0, tmp_path / "summary.md")
    with pytest.raises(DemoError, match=r"^EMA top-1 20.0% below 30.0%: the demo did not learn; see ") as e:
        check_learned(results, 30.0, tmp_path / "summary.md")
    assert e.value.exit_code == EXIT_FAILURE
