"""`shards` with WebDataset output: round trip per layout, quirks, rejections, determinism, verify, errors."""

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.convert import encode, fake, shards, tar
from pipeline.data.convert import verify as shard_verify
from pipeline.data.errors import DataError

CLASSES = 4
SMALL = 6000  # shard bytes: several shards from a few dozen tiny images


@pytest.fixture(scope="module")
def fk(tmp_path_factory):
    return fake.write(tmp_path_factory.mktemp("fake"), num_classes=CLASSES, train_per_class=6,
                      val_per_class=3, min_side=24, max_side=40)


@pytest.fixture(scope="module")
def fk_bad(tmp_path_factory):
    return fake.write(tmp_path_factory.mktemp("fake_bad"), layouts=("folders",), num_classes=CLASSES,
                      train_per_class=4, val_per_class=3, min_side=16, max_side=24, bad=True, seed=1)


def write(src, out, **kw):
    kw = {"formats": ("wds",), "workers": 2, "classes": CLASSES, "shard_bytes": SMALL, "progress": False,
          "log": lambda *_: None, **kw}
    return shards.write_shards(str(src), out, **kw)


def read_wds(out: Path, split: str) -> list[tuple[str, str, bytes, int]]:
    """(key, ext, image bytes, label) of every sample, in shard order."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for sh in manifest["splits"][split]["wds"]["shards"]:
        with tarfile.open(out / "wds" / sh["name"]) as t:
            members = [(m.name, t.extractfile(m).read()) for m in t]
        for (img_name, img), (cls_name, cls) in zip(members[::2], members[1::2], strict=True):
            key, ext = img_name.split(".")
            assert cls_name == f"{key}.cls"
            samples.append((key, ext, img, int(cls.decode("ascii"))))
    return samples


def tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders_out(fk, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "folders"
    write(fk.root / "folders", out)
    return out


def test_round_trip_keys_labels_and_original_bytes(fk, folders_out):
    manifest = json.loads((folders_out / "manifest.json").read_text())
    assert manifest["classes"] == fk.classes
    assert manifest["source"]["layout"] == "folders"
    for split in ("train", "val"):
        samples = read_wds(folders_out, split)
        assert {k: label for k, _, _, label in samples} == fk.samples[split]
        assert len(samples) == len(fk.samples[split])  # every key exactly once
        entry = manifest["splits"][split]
        assert entry["num_samples"] == entry["files_found"] == len(samples) and entry["rejected"] == []
        assert len(entry["wds"]["shards"]) > 1
        counts = [s["num_samples"] for s in entry["wds"]["shards"]]
        firsts = [s["first_index"] for s in entry["wds"]["shards"]]
        assert firsts == [sum(counts[:i]) for i in range(len(counts))]
        files = {p.stem: p.read_bytes() for p in (fk.root / "folders" / split).rglob("*.JPEG")}
        for key, _, data, _ in samples:
            if fk.quirks[split].get(key) != "cmyk":
                assert data == files[key], key  # copy mode keeps the bytes
        labels = [label for *_, label in samples]
        assert labels != sorted(labels)  # a global permutation, not class by class


def test_quirks_are_stored_for_rgb_decoding(fk, folders_out):
    manifest = json.loads((folders_out / "manifest.json").read_text())
    for split in ("train", "val"):
        by_key = {k: (ext, data) for k, ext, data, _ in read_wds(folders_out, split)}
        for key, quirk in fk.quirks[split].items():
            ext, data = by_key[key]
            im = Image.open(io.BytesIO(data))
            assert (ext, im.format, im.mode) == {"cmyk": ("jpg", "JPEG", "RGB"), "gray": ("jpg", "JPEG", "L"),
                                                 "png": ("png", "PNG", "RGB")}[quirk]
        cmyk = [k for k, q in fk.quirks[split].items() if q == "cmyk"]
        assert [Path(c["path"]).stem for c in manifest["splits"][split]["converted"]] == cmyk


def test_every_layout_gives_the_same_shard_bytes(fk, folders_out, tmp_path):
    """Archives and flat val (devkit or Kaggle CSV) give the very shards the folders give."""
    for layout in ("archives", "flat-val", "kaggle"):
        write(fk.root / layout, tmp_path / layout)
        a, b = tree(folders_out / "wds"), tree(tmp_path / layout / "wds")
        assert a == b, layout


def test_deterministic_and_independent_of_workers(fk, folders_out, tmp_path):
    write(fk.root / "folders", tmp_path / "again", workers=1)
    assert tree(tmp_path / "again") == tree(folders_out)


def test_rerun_skips_finished_files_and_redoes_damaged_ones(fk, folders_out, tmp_path):
    out = shutil.copytree(folders_out, tmp_path / "copy")
    before = tree(out)
    first = out / "wds" / "train-000000.tar"
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF
    first.write_bytes(bytes(data))
    (out / "wds" / "val-000001.tar").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "wds").iterdir()}
    write(fk.root / "folders", out)
    assert tree(out) == before
    redone = {p.name for p in (out / "wds").iterdir() if p.stat().st_mtime_ns != mtimes.get(p.name)}
    assert redone == {"train-000000.tar", "val-000001.tar"}


def test_verify_passes_and_catches_a_flipped_byte_and_a_missing_shard(folders_out, tmp_path):
    shard_verify.verify(folders_out, workers=2, log=lambda *_: None)
    out = shutil.copytree(folders_out, tmp_path / "copy")
    shard = out / "wds" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    (out / "wds" / "val-000000.tar").unlink()
    lines = []
    with pytest.raises(DataError, match="2 problems"):
        shard_verify.verify(out, workers=2, log=lines.append)
    assert any("train-000001.tar: sha256 differs" in line for line in lines)
    assert any("val-000000.tar: missing" in line for line in lines)


def test_verify_catches_an_extra_shard_and_bad_content_with_valid_checksums(folders_out, tmp_path):
    out = shutil.copytree(folders_out, tmp_path / "copy")
    shutil.copy(out / "wds" / "train-000000.tar", out / "wds" / "train-999999.tar")
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["splits"]["val"]["wds"]["shards"][0]
    path = out / "wds" / shard["name"]
    w = tar.TarWriter(path)  # a shard with a label out of range and a duplicate key, checksummed
    w.add("ILSVRC2012_val_00000001", "jpg", b"not a jpeg", CLASSES)
    w.add("ILSVRC2012_val_00000001", "jpg", b"not a jpeg", 0)
    w.commit()
    shard.update(bytes=w.bytes, sha256=w.sha.hexdigest(), num_samples=2)
    (out / "manifest.json").write_text(json.dumps(manifest))
    lines = []
    with pytest.raises(DataError):
        shard_verify.verify(out, workers=2, log=lines.append)
    text = "\n".join(lines)
    for expected in ("train-999999.tar: not in the manifest", "outside [0, 4)", "does not decode",
                     "keys occur more than once", "wds shards hold"):
        assert expected in text


def test_bad_files_fail_the_run_unless_allowed(fk_bad, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"6 input files could not be decoded .* --allow-bad 6"):
        write(fk_bad.root / "folders", out)
    assert not (out / "manifest.json").exists()
    assert len(json.loads((out / "rejected.json").read_text())) == 6
    manifest = write(fk_bad.root / "folders", out, allow_bad=6)
    assert not (out / "rejected.json").exists()
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        reasons = {Path(r["path"]).stem: r["reason"] for r in entry["rejected"]}
        assert set(reasons) == set(fk_bad.bad[split])
        for key, kind in fk_bad.bad[split].items():
            assert reasons[key].startswith({"zero-byte": "zero-byte file", "truncated": "truncated",
                                            "undecodable": "undecodable"}[kind])
        assert entry["num_samples"] + len(entry["rejected"]) == entry["files_found"]
        assert {k for k, *_ in read_wds(out, split)} == set(fk_bad.samples[split]) - set(fk_bad.bad[split])


def test_reencode_mode_limits_the_side(fk, tmp_path):
    write(fk.root / "folders", tmp_path / "re", max_side=20, quality=80)
    for _, ext, data, _ in read_wds(tmp_path / "re", "train"):
        im = Image.open(io.BytesIO(data))
        assert ext == "jpg" and im.format == "JPEG" and max(im.size) <= 20


def test_out_not_writable(fk, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not writable"):
        write(fk.root / "folders", tmp_path / "file" / "out")


def _cli(*args, limit_bytes=None):
    def preexec():
        os.setsid()
        if limit_bytes is not None:  # a full disk, as the writer sees it: writes fail past this size
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], preexec_fn=preexec,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    p = _cli("shards", "--src", tmp_path / "missing", "--out", tmp_path / "out")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert err.strip().splitlines() == [f"error: SRC {tmp_path / 'missing'} does not exist: pass the folder "
                                        "that holds your ImageNet copy"]


def test_disk_full_leaves_no_truncated_file_looking_complete(fk, tmp_path):
    out = tmp_path / "out"
    p = _cli("shards", "--src", fk.root / "folders", "--out", out, "--formats", "wds", "--classes", CLASSES,
             "--shard-bytes", 30000, "--workers", 1, "--no-progress", limit_bytes=20000)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "error: no space left writing into" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()
    assert list((out / "wds").glob("*.tmp")) == []
    for shard in (out / "wds").glob("*.tar"):  # only finished shards, each with its record
        record = json.loads((out / ".state" / f"{shard.name}.json").read_text())
        assert shards.sha256_file(shard) == record["sha256"]


def test_reduced_copy_mode_decode_rejects_what_a_full_decode_rejects():
    _, files, _, _ = fake.generate(num_classes=2, train_per_class=4, val_per_class=1, min_side=200,
                                   max_side=300, quirks=True)
    for _, _, data in files["train"]:
        scan = data.find(b"\xff\xda")
        cuts = [data] + ([data[: scan + int((len(data) - scan) * f)] for f in (0.2, 0.9)] if scan > 0 else [])
        for cut in cuts:
            full, reduced = encode.decode(cut, full=True), encode.decode(cut, full=False)
            assert (full[0] is None) == (reduced[0] is None)
            assert (full[0] is None) == (cut is not data)


def test_a_second_run_into_the_same_out_is_refused(fk, tmp_path):
    import fcntl

    (tmp_path / "out" / ".state").mkdir(parents=True)
    with open(tmp_path / "out" / ".state" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another shards run is writing into"):
            write(fk.root / "folders", tmp_path / "out")
