"""Input layouts: each is detected with every key and the right label; every bad SRC gets a clear error."""

import gzip
import io
import shutil
import tarfile

import pytest

from pipeline.data.convert import fake
from pipeline.data.convert import imagenet as sources


@pytest.fixture(scope="module")
def fk(tmp_path_factory):
    return fake.write(tmp_path_factory.mktemp("fake"), num_classes=4, train_per_class=3, val_per_class=2,
                      min_side=16, max_side=24)


@pytest.mark.parametrize("layout,labels", [("folders", "folders"), ("archives", "devkit"),
                                           ("flat-val", "devkit"), ("kaggle", "kaggle-csv")])
def test_layout_gives_every_key_with_its_label(fk, layout, labels):
    src = sources.detect(fk.root / layout, expected_classes=4)
    assert src.layout == ("flat-val" if layout == "kaggle" else layout)
    assert src.labels_from == labels
    assert src.classes == fk.classes  # sorted wnids: label i = classes[i]
    for split in ("train", "val"):
        assert {e.key: e.label for e in src.splits[split]} == fk.samples[split]


def test_archive_entries_read_the_same_bytes_as_the_files(fk):
    archived = sources.detect(fk.root / "archives", 4)
    folders = sources.detect(fk.root / "folders", 4)
    for split in ("train", "val"):
        by_key = {e.key: e for e in folders.splits[split]}
        for e in archived.splits[split]:
            assert e.archive is not None
            assert sources.read_input(e) == sources.read_input(by_key[e.key])


def test_devkit_ids_are_mapped_through_meta_mat_not_used_as_labels(fk):
    """ILSVRC ids in the ground truth are not sorted-wnid indices; meta.mat maps them."""
    with tarfile.open(fk.root / "flat-val" / sources.DEVKIT_TGZ) as t:
        gt = t.extractfile(f"{sources.DEVKIT_DIR}/{sources.DEVKIT_GT}").read().decode().split()
    truth = [fk.samples["val"][f"ILSVRC2012_val_{i:08d}"] for i in range(1, len(gt) + 1)]
    assert [int(x) - 1 for x in gt] != truth


def _copy(fk, layout, tmp_path):
    return shutil.copytree(fk.root / layout, tmp_path / layout)


def test_missing_and_unrecognised_src(tmp_path):
    with pytest.raises(sources.DataError, match="does not exist"):
        sources.detect(tmp_path / "nope")
    (tmp_path / "photos").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(sources.DataError, match=r"found 2 entries \(notes.txt, photos/\); expected one of"):
        sources.detect(tmp_path)


def test_a_class_folder_without_images_is_refused(fk, tmp_path):
    src = tmp_path / "folders"
    shutil.copytree(fk.root / "folders", src)
    empty = sorted((src / "train").iterdir())[1]
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(sources.DataError, match=f"class folder {empty} has no images"):
        sources.detect(src, expected_classes=4)


def test_class_count_must_match_unless_told(fk):
    with pytest.raises(sources.DataError, match="has 4 classes in train, expected 1000: pass --classes 4"):
        sources.detect(fk.root / "folders")


def test_missing_label_file(fk, tmp_path):
    src = _copy(fk, "flat-val", tmp_path)
    (src / sources.DEVKIT_TGZ).unlink()
    with pytest.raises(sources.DataError, match="has no validation labels: put ILSVRC2012_devkit_t12.tar.gz"):
        sources.detect(src, 4)


def test_inconsistent_kaggle_csv(fk, tmp_path):
    src = _copy(fk, "kaggle", tmp_path)
    csv = src / sources.KAGGLE_CSV
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(sources.DataError, match="has 7 validation labels but the validation set has 8 files"):
        sources.detect(src, 4)
    first = lines[1].split(",")[0]
    csv.write_text("\n".join([lines[0], *lines[2:], f"{first},n09999999 1 2 3 4"]) + "\n")
    with pytest.raises(sources.DataError, match=f"gives {first} the class n09999999, which train/ does not"):
        sources.detect(src, 4)


def test_inconsistent_devkit(fk, tmp_path):
    src = _copy(fk, "flat-val", tmp_path)
    tgz = src / sources.DEVKIT_TGZ
    with tarfile.open(tgz) as t:
        members = {m.name: t.extractfile(m).read() for m in t}
    members[f"{sources.DEVKIT_DIR}/{sources.DEVKIT_GT}"] = b"1\n2\n9999\n" * 3
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    tgz.write_bytes(gzip.compress(raw.getvalue()))
    with pytest.raises(sources.DataError, match="line 3 of data/ILSVRC2012_validation_ground_truth.txt is"):
        sources.detect(src, 4)


def test_folder_that_is_not_a_wnid(fk, tmp_path):
    src = _copy(fk, "folders", tmp_path)
    (src / "train" / "cats").mkdir()
    with pytest.raises(sources.DataError, match=r"holds folders that are not WordNet ids \(cats\)"):
        sources.detect(src, 4)
