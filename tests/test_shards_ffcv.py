"""FFCV output: FFCV's own writer's bytes, round trip against the WebDataset shards, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import cv2
import numpy as np
import pytest
from ffcv.reader import Reader
from ffcv.writer import DatasetWriter
from PIL import Image

from pipeline.data.convert import beton as shard_ffcv
from pipeline.data.convert import fake, shards
from pipeline.data.convert import verify as shard_verify

CLASSES = 4
PAGE = 1 << 21  # FFCV's smallest page: small test files


@pytest.mark.parametrize("mode,maps", [("jpg", False), ("raw", False), ("jpg", True)])
def test_beton_bytes_equal_ffcv_dataset_writer(tmp_path, mode, maps):
    """Several pages' worth of samples, written by FFCV's DatasetWriter (1 worker) and by BetonWriter;
    with `maps`, each sample also has a label-map field (FFCV BytesField, variable sizes)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(int(rng.integers(100, 300)), int(rng.integers(100, 300)), 3),
                           dtype=np.uint8) for _ in range(40)]
    blobs = [rng.integers(0, 256, size=int(rng.integers(100, 40_000)), dtype=np.uint8) for _ in images]
    settings = {**shard_ffcv.FFCV_DEFAULTS, "write_mode": mode, "max_resolution": 256, "page_size": PAGE}

    class Samples:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return (images[i], i % 7, blobs[i]) if maps else (images[i], i % 7)

    ours, theirs = tmp_path / "ours.beton", tmp_path / "theirs.beton"
    DatasetWriter(str(theirs), shard_ffcv.fields(settings, maps), page_size=PAGE, num_workers=1) \
        .from_indexed_dataset(Samples())
    writer = shard_ffcv.BetonWriter(str(ours), settings, capacity=len(images), label_maps=maps)
    field = shard_ffcv.fields(settings)["image"]
    for i, image in enumerate(images):
        writer.add(shard_ffcv.encode_image(field, image, seed=i), i % 7, blobs[i].tobytes() if maps else None)
    writer.close()
    assert ours.stat().st_size > 2 * PAGE  # more than one page was filled
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.fixture(scope="module")
def fk(tmp_path_factory):
    return fake.write(tmp_path_factory.mktemp("fake"), layouts=("folders",), num_classes=CLASSES,
                      train_per_class=6, val_per_class=3, min_side=24, max_side=48)


def _ffcv(mode="jpg"):
    return {"write_mode": mode, "max_resolution": 40, "page_size": PAGE}


def _samples(beton):
    """(label, HxWx3 image) of every sample of a .beton, read with FFCV's Reader."""
    r = Reader(str(beton))
    image, label = (r.metadata[n] for n in r.metadata.dtype.names)
    data = beton.read_bytes()
    out = []
    for i in range(int(r.num_samples)):
        ptr, size = int(r.alloc_table["ptr"][i]), int(r.alloc_table["size"][i])
        h, w = int(image["height"][i]), int(image["width"][i])
        payload = np.frombuffer(data[ptr:ptr + size], np.uint8)
        if image["mode"][i] == 0:
            pixels = cv2.cvtColor(cv2.imdecode(payload, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            pixels = payload.reshape(h, w, 3)
        assert pixels.shape == (h, w, 3)
        out.append((int(label[i]), pixels))
    return out


@pytest.mark.slow
def test_ffcv_round_trip_matches_wds_order_labels_and_pixels(fk, tmp_path):
    out = tmp_path / "out"
    manifest = shards.write_shards(str(fk.root / "folders"), out, workers=2, classes=CLASSES,
                                   shard_bytes=6000, ffcv=_ffcv("raw"), progress=False, log=lambda *_: None)
    files = {p.stem: p for p in (fk.root / "folders").rglob("*.JPEG")}
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        wds = []  # (key, label) in shard order
        for sh in entry["wds"]["shards"]:
            with tarfile.open(out / "wds" / sh["name"]) as t:
                members = [(m.name, t.extractfile(m).read()) for m in t]
            wds += [(name.split(".")[0], int(c)) for (name, _), (_, c) in zip(members[::2], members[1::2],
                                                                               strict=True)]
        beton = _samples(out / "ffcv" / f"{split}.beton")
        assert entry["ffcv"]["num_samples"] == len(beton) == len(wds) == entry["num_samples"]
        for (label, pixels), (key, wds_label) in zip(beton, wds, strict=True):
            assert label == wds_label == fk.samples[split][key]
            expected = np.asarray(Image.open(files[key]).convert("RGB"))
            scale = 40 / max(expected.shape[:2])  # FFCV's max_resolution, with cv2's INTER_AREA
            if scale < 1:
                size = (int(expected.shape[1] * scale), int(expected.shape[0] * scale))
                expected = cv2.resize(expected, size, interpolation=cv2.INTER_AREA)
            assert np.array_equal(pixels, expected)  # raw mode: exact pixels; CMYK, gray, PNG as RGB
    shard_verify.verify(out, workers=2, log=lambda *_: None)


@pytest.mark.slow
def test_single_formats_and_ffcv_damage(fk, tmp_path):
    only_ffcv = shards.write_shards(str(fk.root / "folders"), tmp_path / "f", formats=("ffcv",), workers=2,
                                    classes=CLASSES, ffcv=_ffcv(), progress=False, log=lambda *_: None)
    assert "wds" not in only_ffcv["splits"]["train"] and not (tmp_path / "f" / "wds").exists()
    beton = tmp_path / "f" / "ffcv" / "val.beton"
    data = bytearray(beton.read_bytes())
    data[-200] ^= 1
    beton.write_bytes(bytes(data))
    lines = []
    with pytest.raises(shards.DataError):
        shard_verify.verify(tmp_path / "f", workers=2, log=lines.append)
    assert any("val.beton: sha256 differs" in line for line in lines)


def _cli_shards(src, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "shards", "--src", str(src), "--out", str(out), "--classes",
         str(CLASSES), "--shard-bytes", "20000", "--ffcv-page-size", str(PAGE), "--ffcv-max-resolution", "64",
         "--no-progress", *extra],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("labels", [False, True], ids=["plain", "label_maps"])
def test_kill_at_any_moment_then_resume_gives_identical_bytes(tmp_path, labels):
    """Also with LABELS (`shards --labels`): each train sample's map is written with it, in both formats."""
    from tests.test_shards_label_maps import write_maps

    fk = fake.write(tmp_path / "fake", layouts=("folders",), num_classes=CLASSES, train_per_class=30,
                    val_per_class=10, min_side=32, max_side=64)
    src = fk.root / "folders"
    maps = str(write_maps(tmp_path / "maps", fk.samples["train"])) if labels else None
    extra = ["--labels", maps] if labels else []
    reference = tmp_path / "reference"  # the uninterrupted run
    shards.write_shards(str(src), reference, workers=2, classes=CLASSES, shard_bytes=20000,
                        ffcv={"page_size": PAGE, "max_resolution": 64}, progress=False, log=lambda *_: None,
                        labels=maps)
    out = tmp_path / "out"
    for wait_for in ("train-000001.tar.json", "train.beton.json"):  # mid-train wds, then mid-val
        p = _cli_shards(src, out, "--workers", "1", *extra)
        deadline = time.monotonic() + 240
        while not (out / ".state" / wait_for).exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL  # killed while still running
        assert not (out / "manifest.json").exists()
    p = _cli_shards(src, out, "--workers", "2", *extra)
    assert p.wait(timeout=300) == 0, p.stdout.read()
    files = sorted(x.relative_to(reference) for x in reference.rglob("*") if x.is_file())
    assert files == sorted(x.relative_to(out) for x in out.rglob("*") if x.is_file())
    for f in files:
        assert (out / f).read_bytes() == (reference / f).read_bytes(), f
    train = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert train["num_samples"] == 120 and ("label_maps" in train) == labels


def test_an_image_larger_than_a_page_is_a_clear_error(tmp_path):
    settings = {**shard_ffcv.FFCV_DEFAULTS, "write_mode": "raw", "max_resolution": None, "page_size": PAGE}
    writer = shard_ffcv.BetonWriter(str(tmp_path / "x.beton"), settings, capacity=1)
    field = shard_ffcv.fields(settings)["image"]
    big = shard_ffcv.encode_image(field, np.zeros((1000, 1000, 3), np.uint8), seed=0)
    with pytest.raises(shards.DataError, match="more than the FFCV page size 2097152: lower --ffcv-max-res"):
        writer.add(big, 0)
    writer.abort()
    assert not (tmp_path / "x.beton").exists()


@pytest.mark.slow
def test_resume_that_redoes_one_shard_and_the_beton_keeps_the_manifest(tmp_path):
    """Finished shards are re-read only for the .beton; their rejections must not be counted twice."""
    fk = fake.write(tmp_path / "fake", layouts=("folders",), num_classes=CLASSES, train_per_class=5,
                    val_per_class=2, min_side=16, max_side=24, bad=True, seed=2)
    out = tmp_path / "out"
    kw = {"workers": 2, "classes": CLASSES, "shard_bytes": 3000, "ffcv": _ffcv(), "allow_bad": 6,
          "progress": False, "log": lambda *_: None}
    shards.write_shards(str(fk.root / "folders"), out, **kw)
    files = ("manifest.json", "ffcv/train.beton", "wds/train-000000.tar")
    before = {p: (out / p).read_bytes() for p in files}
    (out / "wds" / "train-000000.tar").unlink()
    (out / "ffcv" / "train.beton").unlink()
    shards.write_shards(str(fk.root / "folders"), out, **kw)
    assert {p: (out / p).read_bytes() for p in before} == before
