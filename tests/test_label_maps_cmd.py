"""`label-maps`: maps from a tiny teacher (rmt_t, random weights) on the fake ImageNet; resume; shards."""

import os

import pytest
import torch

from pipeline.cli import main
from pipeline.data import label_maps
from pipeline.data.convert import fake, shards
from pipeline.data.convert.imagenet import detect, read_input
from pipeline.label_maps_cmd import generate, load_teacher, position_logits, teacher_input

CLASSES = 6


@pytest.fixture(scope="module")
def fk(tmp_path_factory):
    return fake.write(tmp_path_factory.mktemp("fake"), layouts=("folders",), num_classes=CLASSES,
                      train_per_class=2, val_per_class=1, min_side=24, max_side=40, quirks=False)


def test_maps_from_a_tiny_teacher_resume_and_go_into_shards(fk, tmp_path):
    out = tmp_path / "maps"
    torch.manual_seed(0)
    src = str(fk.root / "folders")
    assert main(["label-maps", "--teacher", "rmt_t", "--src", src, "--out", str(out),
                 "--classes", str(CLASSES), "--img-size", "64", "--batch-size", "5", "--device", "cpu",
                 "--no-progress"]) == 0
    keys = sorted(fk.samples["train"])
    for key in keys:
        scores, idx = label_maps.read_pt(out, key, CLASSES)  # validates: fp16 [2, 5, 2, 2]
        assert scores.shape == (5, 2, 2)
        assert (scores[:-1] >= scores[1:]).all()  # top-k in descending order
    assert not list(out.rglob("*.tmp"))
    # the map is the teacher's own head at every final-stage position, top-5
    torch.manual_seed(0)
    teacher = load_teacher("rmt_t", CLASSES, pretrained=False, ema=False)
    m = torch.load(label_maps.map_path(out, keys[0]), weights_only=True)
    entry = next(e for e in detect(src, CLASSES).splits["train"] if e.key == keys[0])
    with torch.no_grad():
        logits = position_logits(teacher, teacher_input(read_input(entry), 64)[None])[0]
    v, i = logits.topk(5, dim=0)
    assert torch.equal(m[1].long(), i) and torch.allclose(m[0].float(), v, atol=1e-2)
    assert logits.shape == (CLASSES, 2, 2) and teacher.global_pool == "avg"  # the teacher is left as it was
    # resume: only the missing map is written; the others keep their files
    gone = label_maps.map_path(out, keys[4])
    gone.unlink()
    before = {k: os.stat(label_maps.map_path(out, k)).st_mtime_ns for k in keys if k != keys[4]}
    lines = []
    counts = generate("rmt_t", src, str(out), classes=CLASSES, img_size=64, progress=False, log=lines.append)
    assert counts == {"written": 1, "skipped": len(keys) - 1, "bad": 0} and gone.is_file()
    assert before == {k: os.stat(label_maps.map_path(out, k)).st_mtime_ns for k in before}
    # and the shards command takes them
    manifest = shards.write_shards(src, tmp_path / "shards", formats=("wds",), workers=1, classes=CLASSES,
                                   progress=False, log=lambda *_: None, labels=str(out))
    assert manifest["splits"]["train"]["num_samples"] == len(keys)


def test_bad_teacher_is_a_one_line_error(fk, tmp_path, capsys):
    assert main(["label-maps", "--teacher", "no_such_model", "--src", str(fk.root / "folders"), "--out",
                 str(tmp_path), "--classes", str(CLASSES), "--no-progress"]) == 2
    assert "--teacher no_such_model: neither a path nor a timm model name" in capsys.readouterr().err
