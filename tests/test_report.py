"""`python -m pipeline report`: plots and summary from a metrics.jsonl in the run contract's format,
resumed runs (duplicate steps keep the last record), a run without EMA or evaluation, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.report import PLOTS, ReportError, read_metrics, write_report


def train(step: int, epoch: int, loss: float, t: float) -> dict:
    return {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": 1e-3 * step / 20,
            "grad_norm": 1.0, "images_per_s": 40.0 + step, "images_per_s_per_device": 20.0 + step / 2,
            "step_time_s": 0.4, "data_wait_frac": 0.1, "mfu": 1e-5, "max_mem_gb": 1.5, "time": t}


def evaluation(step: int, epoch: int, top1: float, t: float, ema: bool = True) -> dict:
    rec = {"kind": "eval", "step": step, "epoch": epoch, "top1": top1, "top5": min(100.0, top1 + 30),
           "loss": 2.0 - top1 / 100, "time": t}
    if ema:
        rec.update({"ema_top1": top1 / 2, "ema_top5": top1, "ema_loss": 2.2})
    return rec


def write_run(run: Path, records: list[dict], num_classes: int = 10) -> Path:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {"model": {"name": "rmt_t", "num_classes": num_classes, "drop_path": 0.1},
           "data": {"root": "shards/demo", "format": "wds", "img_size": 64, "eval_img_size": 64},
           "train": {"global_batch": 16, "max_batch_per_device": 8, "epochs": 2, "precision": "bf16"},
           "optim": {"lr": 5e-4, "lr_base_batch": 16, "schedule": "step"}, "deepspeed": {"zero_stage": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def resumed_run(run: Path) -> Path:
    """2 epochs of 10 steps; stopped on a signal at step 14; the resumed start re-logs steps 14-15
    (as after a crash between checkpoints) with different values, which must win."""
    recs = [train(s, 0, 2.0 - s / 20, 100 + s) for s in (2, 4, 6, 8, 10)]
    recs += [evaluation(10, 1, 40.0, 111), train(12, 1, 1.4, 112), train(14, 1, 1.3, 114),
             {"kind": "end", "step": 14, "epoch": 1, "reason": "signal", "time": 115}]
    recs += [train(14, 1, 1.25, 200), train(16, 1, 1.1, 202), train(18, 1, 1.0, 204), train(20, 1, 0.9, 206),
             evaluation(20, 2, 70.0, 207), {"kind": "end", "step": 20, "epoch": 2, "reason": "finished",
                                             "time": 208}]
    return write_run(run, recs)


def test_plots_and_summary_of_a_resumed_run(tmp_path):
    run = resumed_run(tmp_path / "run")
    res = write_report(run)
    for name in PLOTS:
        with Image.open(run / "report" / name) as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 400
    m = res["metrics"]
    assert [r["step"] for r in m.train] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert [r["loss"] for r in m.train if r["step"] == 14] == [1.25]
    assert len(m.segments) == 2 and [e["reason"] for e in m.ends] == ["signal", "finished"]
    text = (run / "report" / "summary.md").read_text()
    assert "| model | 70.00 | 100.00 | 70.00 (2) |" in text
    assert "| EMA | 35.00 | 70.00 | 35.00 (2) |" in text
    assert "starts: 2 (1 resumes); stopped on a signal: 1 times" in text
    # running time counts each start from its first to its last record, not the gap between them
    assert "first to last record: 1m 46s; while running: 0m 21s" in text
    assert "20 optimizer steps; state: finished" in text
    assert "rmt_t (10 classes" in text and "ZeRO-2" in text and "global batch 16" in text
    assert "as RMT reports top-1): 70.00 (model, epoch 2)" in text and "**Paper's number**" in text
    for name in PLOTS:
        assert f"({name})" in text


def test_run_without_ema_or_eval_yet(tmp_path):
    run = write_run(tmp_path / "run", [train(s, 0, 2.0, 100 + s) for s in (1, 2, 3)])
    write_report(run, tmp_path / "out")
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "No evaluation yet." in text and "running (or killed: no end record)" in text
    assert all((tmp_path / "out" / name).is_file() for name in PLOTS)

    run = write_run(tmp_path / "noema", [train(2, 0, 2.0, 1), evaluation(2, 1, 50.0, 2, ema=False)])
    text = write_report(run)["summary"].read_text()
    assert "| model | 50.00 |" in text and "| EMA |" not in text


def test_cut_last_line_is_ignored_but_damage_elsewhere_is_an_error(tmp_path):
    run = write_run(tmp_path / "run", [train(1, 0, 2.0, 1), train(2, 0, 1.9, 2)])
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + '{"kind": "train", "st')
    assert [r["step"] for r in read_metrics(path).train] == [1, 2]
    path.write_text('{"kind": "tra\n' + path.read_text())
    with pytest.raises(ReportError, match=r"metrics.jsonl:1 is not JSON"):
        read_metrics(path)


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "report", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: run dir '{tmp_path / 'missing'}' does not exist: pass the output_dir of a training run"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "report", str(tmp_path / "empty")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "has no train or eval records yet" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_writes_the_report(tmp_path):
    run = resumed_run(tmp_path / "run")
    cmd = [sys.executable, "-m", "pipeline", "report", str(run), "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"report: {tmp_path / 'r' / 'summary.md'}"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted([*PLOTS, "summary.md"])


def test_the_papers_number_is_the_best_epoch_of_model_or_ema(tmp_path):
    """As RMT-S: the EMA peaks before the end and above the model; the trainer's eval records say so too."""
    from pipeline.train.metrics import BestSoFar

    evals = [{"top1": 60.0, "ema_top1": 62.0}, {"top1": 61.0, "ema_top1": 61.5}]
    best = BestSoFar()
    fields = [best.update(epoch, res) for epoch, res in enumerate(evals, start=1)]
    assert fields[-1] == {"best_top1": 61.0, "best_top1_epoch": 2, "best_ema_top1": 62.0,
                          "best_ema_top1_epoch": 1, "paper_top1": 62.0, "paper_top1_epoch": 1,
                          "paper_top1_weights": "EMA"}
    pairs = enumerate(zip(evals, fields, strict=True), start=1)
    recs = [{**evaluation(10 * e, e, 0.0, e), **res, **f} for e, (res, f) in pairs]
    text = write_report(write_run(tmp_path / "run", [train(1, 0, 2.0, 0.5), *recs]))["summary"].read_text()
    assert "| EMA | 61.50 | " in text and "62.00 (1) |" in text
    assert "62.00 (EMA, epoch 1)" in text
