"""Fake ImageNet: real file names per layout, every quirk and bad file, realistic sizes, learnable classes."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.convert import fake
from pipeline.data.convert import imagenet as sources


@pytest.fixture(scope="module")
def fk(tmp_path_factory):
    return fake.write(tmp_path_factory.mktemp("fake"), num_classes=4, train_per_class=5, val_per_class=3,
                      min_side=24, max_side=48, bad=True)


def test_every_layout_has_the_real_file_names(fk):
    root = fk.root
    wnid = fk.classes[0]
    train_key = next(k for k, label in fk.samples["train"].items() if label == 0)
    assert (root / "folders" / "train" / wnid / f"{train_key}.JPEG").is_file()
    assert (root / "folders" / "val" / fk.classes[fk.samples["val"]["ILSVRC2012_val_00000001"]]
            / "ILSVRC2012_val_00000001.JPEG").is_file()
    assert (root / "flat-val" / "val" / "ILSVRC2012_val_00000001.JPEG").is_file()
    assert (root / "kaggle" / sources.KAGGLE_ROOT / "val" / "ILSVRC2012_val_00000001.JPEG").is_file()
    assert (root / "kaggle" / "LOC_val_solution.csv").read_text().startswith("ImageId,PredictionString\n")
    with tarfile.open(root / "archives" / "ILSVRC2012_img_train.tar") as t:
        assert sorted(t.getnames()) == [f"{w}.tar" for w in fk.classes]
        inner = tarfile.open(fileobj=io.BytesIO(t.extractfile(f"{wnid}.tar").read()))
        assert f"{train_key}.JPEG" in inner.getnames()
    with tarfile.open(root / "archives" / "ILSVRC2012_devkit_t12.tar.gz") as t:
        assert set(t.getnames()) == {"ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                                     "ILSVRC2012_devkit_t12/data/meta.mat"}
    assert all(w.startswith("n0") and len(w) == 9 for w in fk.classes) and fk.classes == sorted(fk.classes)


def test_quirks_and_bad_files_are_real(fk):
    val_dir = fk.root / "flat-val" / "val"
    for split in ("train", "val"):
        assert sorted(fk.quirks[split].values()) == sorted(fake.QUIRKS)
        assert sorted(fk.bad[split].values()) == sorted(fake.BAD)
    for key, quirk in fk.quirks["val"].items():
        im = Image.open(val_dir / f"{key}.JPEG")
        im.load()
        assert (im.format, im.mode) == {"cmyk": ("JPEG", "CMYK"), "gray": ("JPEG", "L"),
                                        "png": ("PNG", "RGB")}[quirk]
    for key, kind in fk.bad["val"].items():
        data = (val_dir / f"{key}.JPEG").read_bytes()
        assert (len(data) == 0) == (kind == "zero-byte")
        with pytest.raises(Exception):  # noqa: B017 (PIL raises OSError or UnidentifiedImageError)
            Image.open(io.BytesIO(data)).load()


def test_default_sizes_are_realistic():
    _, files, _, _ = fake.generate(num_classes=2, train_per_class=12, val_per_class=1, quirks=False,
                                   large_fraction=0.2)
    sides = np.array([Image.open(io.BytesIO(d)).size for _, _, d in files["train"]])
    assert sides.min() >= 200 and sides.max() <= 1000
    assert np.mean(sides.max(axis=1) <= 500) >= 0.5
    sizes = [len(d) for _, _, d in files["train"]]
    assert 5_000 < np.median(sizes) < 300_000


def test_classes_are_told_apart_by_a_trivial_classifier():
    """Nearest class mean of the colour of saturated pixels: far above chance, so a tiny model learns it."""
    _, files, _, _ = fake.generate(num_classes=6, train_per_class=12, val_per_class=6, min_side=32,
                                   max_side=48, quirks=False, seed=3)

    def hist(data):
        px = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).reshape(-1, 3).astype(float)
        return px[px.max(1) - px.min(1) > 80].mean(0)

    xtr = np.array([hist(d) for _, _, d in files["train"]])
    ytr = np.array([label for _, label, _ in files["train"]])
    means = np.stack([xtr[ytr == c].mean(0) for c in range(6)])
    xva = np.array([hist(d) for _, _, d in files["val"]])
    yva = np.array([label for _, label, _ in files["val"]])
    pred = np.argmin(((xva[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == yva) >= 0.8


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(sources.DataError, match="min-side"):
        fake.write(tmp_path, num_classes=2, min_side=100, max_side=50)
    with pytest.raises(sources.DataError, match="unknown fake layout"):
        fake.write(tmp_path, layouts=("zip",), num_classes=2, train_per_class=1, val_per_class=1,
                   min_side=16, max_side=16)
