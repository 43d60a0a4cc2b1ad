"""`export` and `eval` on a real 2-process ZeRO-2 run: consolidated fp32 weights load into timm and give
the trained model's logits; evaluation counts every validation image once."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import pipeline.models
from pipeline.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def tiny(trainer):
    torch.manual_seed(0)
    return timm.create_model("rmt_t", num_classes=4, **trainer.MODEL["kwargs"]).eval()


def test_export_loads_in_timm_with_the_trained_logits(trainer, reference_run, tmp_path, capsys):
    _, run = reference_run
    tag_dir = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert main(["export", str(run), "--out", str(tmp_path / "model.safetensors")]) == 0
    exported = load_file(tmp_path / "model.safetensors")
    # ZeRO-2 under torch autocast keeps the module in fp32: its saved state is the trained model
    trained = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert exported.keys() == trained.keys()
    assert all(exported[k].dtype == torch.float32 for k in exported if trained[k].is_floating_point())
    model, reference = tiny(trainer), tiny(trainer)
    model.load_state_dict(exported)
    reference.load_state_dict(trained)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(x), reference(x))

    assert main(["export", str(tag_dir), "--out", str(tmp_path / "ema.pth"), "--ema", "--pth"]) == 0
    ema = torch.load(tmp_path / "ema.pth", weights_only=True)
    assert set(ema) == {"model"}
    assert all(torch.equal(ema["model"][k], v) for k, v in torch.load(tag_dir / "ema.pt").items())
    official = pipeline.models.load_rmt_checkpoint(tmp_path / "ema.pth")
    tiny(trainer).load_state_dict(official)
    assert not torch.equal(official["head.weight"], exported["head.weight"])


def test_eval_counts_every_image_and_agrees_with_the_exported_file(reference_run, tmp_path, capsys):
    config, run = reference_run
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["count"] == 16 and 0.0 <= res["top1"] <= 100.0 and res["top5"] >= res["top1"]
    last_eval = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line][-1]
    # the run's own evaluation (2 ranks, autocast) and this one (1 process, fp32 on CPU) agree
    assert res["top1"] == pytest.approx(last_eval["top1"], abs=100 / 16 + 1e-6)
    assert res["loss"] == pytest.approx(last_eval["loss"], rel=0.05)

    assert main(["export", str(run), "--out", str(tmp_path / "m.pth"), "--pth"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pth"), "--config", str(run / "config.yaml")]) == 0
    official = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (official["top1"], official["loss"], official["count"]) == (res["top1"], res["loss"], 16)

    assert main(["eval", "--checkpoint", str(run), "--ema"]) == 0
    ema = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ema["count"] == 16 and ema["top1"] == pytest.approx(last_eval["ema_top1"], abs=100 / 16 + 1e-6)


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "weights.pth").write_bytes(b"")
    assert main(["eval", "--checkpoint", str(tmp_path / "weights.pth")]) == 2
    assert "pass --config" in capsys.readouterr().err
