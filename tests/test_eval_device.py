"""`python -m pipeline eval` of an exported model with data.decode=device (the CPU as the device): every
validation image counted once, top-1 within 1 point of the CPU decode path's, both formats; and the same
eval split over 2 ranks (the README's `torchrun ... -m pipeline eval`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline.cli import main
from tests.conftest import fake_shards

pytest.importorskip("ffcv")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

NUM_VAL = 400  # one point of top-1 is 4 images


@pytest.fixture(scope="module")
def val_root(tmp_path_factory):
    """400 validation images of the 4 classes `reference_run` learnt (label k is the same pattern whatever the
    seed), sides 40-160 px (5% up to 320; the CPU path decodes those with a shorter side >= 72 in JPEG draft
    mode, the device path fully), with the fake dataset's CMYK, grayscale and PNG files."""
    return fake_shards(tmp_path_factory.mktemp("eval_device"), train=4, val=NUM_VAL, min_side=40,
                       max_side=160, seed=1, shard_bytes=1_000_000)


@pytest.fixture(scope="module")
def exported(reference_run, tmp_path_factory):
    """The reference run's model exported as an official .pth, and the run's config."""
    _, run = reference_run
    model = tmp_path_factory.mktemp("exported") / "model.pth"
    assert main(["export", str(run), "--out", str(model), "--pth"]) == 0
    return model, run / "config.yaml"


def test_eval_of_an_exported_model_on_the_device_path_agrees_with_the_cpu_path(exported, val_root, capsys):
    """The reference run's model (2-process ZeRO-2, 3 epochs of the full recipe), exported as an official
    .pth: top-1 well above chance (25%; measured 42.75 on the CPU path, 42.50 on the device path, both
    formats), so that agreement within 1 point (4 images) means something; loss within 1% (measured
    0.01% wds, 0.07% FFCV). The 2-rank split (every image once, in order) is tests/test_loader_device.py's."""
    model, config = exported
    res = {}
    for fmt in ("wds", "ffcv"):
        for decode in ("cpu", "device"):
            capsys.readouterr()
            assert main(["eval", "--checkpoint", str(model), "--config", str(config),
                         f"data.root={val_root}", f"data.format={fmt}", f"data.decode={decode}"]) == 0
            res[fmt, decode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print("eval top-1 / loss, cpu vs device path: " + "; ".join(
        f"{fmt} {res[fmt, 'cpu']['top1']:.2f} / {res[fmt, 'device']['top1']:.2f}, "
        f"{res[fmt, 'cpu']['loss']:.4f} / {res[fmt, 'device']['loss']:.4f}" for fmt in ("wds", "ffcv")))
    for fmt in ("wds", "ffcv"):
        cpu, device = res[fmt, "cpu"], res[fmt, "device"]
        assert cpu["count"] == device["count"] == NUM_VAL
        assert cpu["top1"] > 35.0, cpu  # 400 images at chance: 25 +- 2.2
        assert device["top1"] == pytest.approx(cpu["top1"], abs=1.0), fmt
        assert device["loss"] == pytest.approx(cpu["loss"], rel=0.01), fmt


def test_eval_split_over_two_ranks_counts_every_image_once_and_agrees(exported, val_root, capsys):
    """2 ranks as torchrun starts them (RANK, WORLD_SIZE, MASTER_*): rank 0 prints the whole set's numbers,
    equal to one process's (the same 400 images, each once; the loss a sum in another order)."""
    model, config = exported
    args = ["eval", "--checkpoint", str(model), "--config", str(config), f"data.root={val_root}",
            "data.format=wds"]
    capsys.readouterr()
    assert main(args) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port)} for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", *args], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1", **rank})
             for rank in ranks]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    split = json.loads(outs[0][0].strip().splitlines()[-1])
    assert not [line for line in outs[1][0].splitlines() if line.startswith("{")]  # only rank 0 reports
    assert split["count"] == single["count"] == NUM_VAL
    assert (split["top1"], split["top5"]) == (single["top1"], single["top5"])
    assert split["loss"] == pytest.approx(single["loss"], rel=1e-5)
