"""`python -m pipeline eval` with data.decode=device (the CPU as the device) on a real 2-process run:
every validation image counted once, the same top-1 as the CPU decode path up to one image."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_eval_on_the_device_path_agrees_with_the_cpu_path(reference_run, capsys):
    _, run = reference_run
    res = {}
    for decode in ("cpu", "device"):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(run), f"data.decode={decode}"]) == 0
        res[decode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(f"eval cpu vs device path: top-1 {res['cpu']['top1']:.2f} / {res['device']['top1']:.2f}, "
          f"loss {res['cpu']['loss']:.4f} / {res['device']['loss']:.4f}")
    assert res["cpu"]["count"] == res["device"]["count"] == 16
    # 16 images: one image is 6.25 points; the device path decodes fully where the CPU path uses JPEG
    # draft mode, about 1 level of difference per pixel
    assert res["device"]["top1"] == pytest.approx(res["cpu"]["top1"], abs=100 / 16 + 1e-6)
    assert res["device"]["loss"] == pytest.approx(res["cpu"]["loss"], rel=0.05)
