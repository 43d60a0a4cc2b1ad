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


TINY = {"embed_dims": [16, 32, 64, 64], "depths": [1, 1, 1, 1], "num_heads": [2, 2, 4, 4], "projection": 64}


def test_a_weights_file_teacher_takes_its_config_and_a_token_label_rmt_teaches_with_its_aux_head(
        fk, tmp_path, capsys):
    import timm
    import yaml
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("rmt_t", num_classes=CLASSES, token_label=True, **TINY).eval()
    weights = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), str(weights))
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "rmt_t", "num_classes": CLASSES,
                                                "kwargs": {**TINY, "token_label": True}}}))
    src, out = str(fk.root / "folders"), tmp_path / "maps"
    args = ["label-maps", "--teacher", str(weights), "--src", src, "--out", str(out),
            "--classes", str(CLASSES), "--img-size", "64", "--no-progress"]
    assert main(args) == 2  # a weights file does not say which model it is
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a weights file: pass --config" in err[0], err
    assert main([*args, "--config", str(config)]) == 0
    key = sorted(fk.samples["train"])[0]
    entry = next(e for e in detect(src, CLASSES).splits["train"] if e.key == key)
    x = teacher_input(read_input(entry), 64)[None]
    with torch.no_grad():
        tokens = model.aux_head(model.forward_features(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)[0]
        pool, model.global_pool = model.global_pool, ""
        class_head = model._class_logits(model.forward_features(x))[0]
        model.global_pool = pool
    m = torch.load(label_maps.map_path(out, key), weights_only=True)
    v, i = tokens.topk(5, dim=0)
    assert torch.equal(m[1].long(), i) and torch.allclose(m[0].float(), v, atol=1e-2)
    assert not torch.equal(class_head.topk(5, dim=0).indices, i)  # the class head per token differs


def test_a_timm_cnn_teaches_with_its_classifier_at_every_position():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_nfnet", num_classes=CLASSES).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        per_position = position_logits(model, x)
        pooled = model(x)
    assert per_position.shape[:2] == (2, CLASSES) and per_position.shape[2] * per_position.shape[3] > 1
    # the classifier is linear after average pooling: the mean over positions is the model's own output
    assert torch.allclose(per_position.mean(dim=(2, 3)), pooled, atol=1e-5)


def test_pretrained_without_timm_weights_is_a_one_line_error_naming_the_fix(fk, tmp_path, capsys):
    assert main(["label-maps", "--teacher", "rmt_l_tl", "--pretrained", "--src", str(fk.root / "folders"),
                 "--out", str(tmp_path), "--classes", str(CLASSES), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --teacher rmt_l_tl --pretrained: timm has no pretrained weights for rmt_l_tl; "
                   "give a weights file and its recipe instead (e.g. --teacher rmt_l_tl.pth --config "
                   "configs/rmt_l_tl.yaml) or a run of ours"]
