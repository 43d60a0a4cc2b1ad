"""`shards --labels`: each train image's label map stored with it (wds member, .beton field), recorded,
verified; errors named."""

import json
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.data import label_maps
from pipeline.data.convert import fake, shards
from pipeline.data.convert import verify as shard_verify
from pipeline.data.errors import DataError

CLASSES = 4


@pytest.fixture(scope="module")
def fk(tmp_path_factory):
    return fake.write(tmp_path_factory.mktemp("fake"), layouts=("folders",), num_classes=CLASSES,
                      train_per_class=5, val_per_class=2, min_side=24, max_side=40)


def write_maps(root: Path, keys, skip=()) -> Path:
    """A synthetic fp16 [2, 5, 3, 4] map per key (scores and class indices derived from the key)."""
    for n, key in enumerate(sorted(keys)):
        if key in skip:
            continue
        g = torch.Generator().manual_seed(n)
        m = torch.stack([torch.randn(5, 3, 4, generator=g),
                         torch.randint(0, CLASSES, (5, 3, 4), generator=g)])
        path = label_maps.map_path(root, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(m.half(), path)
    return root


def write(fk, out, **kw):
    kw = {"formats": ("wds",), "workers": 2, "classes": CLASSES, "shard_bytes": 6000, "progress": False,
          "log": lambda *_: None, **kw}
    return shards.write_shards(str(fk.root / "folders"), out, **kw)


def members(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    got: dict[str, dict[str, bytes]] = {}
    for sh in json.loads((out / "manifest.json").read_text())["splits"][split]["wds"]["shards"]:
        with tarfile.open(out / "wds" / sh["name"]) as t:
            for m in t:
                key, _, ext = m.name.partition(".")
                got.setdefault(key, {})[ext] = t.extractfile(m).read()
    return got


def tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "lock"}


def test_maps_are_stored_recorded_verified_and_deterministic(fk, tmp_path):
    maps = write_maps(tmp_path / "maps", fk.samples["train"])
    plain = write(fk, tmp_path / "plain")
    m = write(fk, tmp_path / "a", labels=str(maps))
    assert m["options"]["labels"] == str(maps.resolve())
    assert m["splits"]["train"]["label_maps"] == {"member": "tlm", "encoding": "TLM1"}
    assert "label_maps" not in m["splits"]["val"] and "labels" not in plain["options"]
    train = members(tmp_path / "a", "train")
    assert set(train) == set(fk.samples["train"])
    for key, got in train.items():
        assert got["tlm"] == label_maps.encode(*label_maps.read_pt(maps, key, CLASSES))
    assert all("tlm" not in v for v in members(tmp_path / "a", "val").values())
    assert members(tmp_path / "plain", "val") == members(tmp_path / "a", "val")
    shard_verify.verify(tmp_path / "a", workers=2, log=lambda *_: None)
    # deterministic whatever the worker count; a re-run skips every file (resume records match)
    write(fk, tmp_path / "b", labels=str(maps), workers=1)
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    lines = []
    write(fk, tmp_path / "b", labels=str(maps), log=lines.append)
    assert "complete, 0 images to process" in lines[0]
    # adding maps to shards written without them redoes the train shards (the plan includes LABELS)
    lines.clear()
    write(fk, tmp_path / "plain", labels=str(maps), log=lines.append)
    assert "complete, 0 images to process" not in lines[0]
    assert tree(tmp_path / "plain") == tree(tmp_path / "a")


def test_a_missing_map_names_the_image_or_is_counted_under_allow_bad(fk, tmp_path):
    missing = sorted(fk.samples["train"])[3]
    maps = write_maps(tmp_path / "maps", fk.samples["train"], skip={missing})
    want = (r"^1 label maps \(LABELS\) are missing or damaged \(listed above and in .*rejected.json\); "
            r"write those maps \(python -m pipeline label-maps skips the good ones\), or accept them with "
            r"--allow-bad 1 ")
    with pytest.raises(DataError, match=want):
        write(fk, tmp_path / "out", labels=str(maps))
    rejected = json.loads((tmp_path / "out" / "rejected.json").read_text())
    assert len(rejected) == 1 and f"no label map for {missing}: " in rejected[0]["reason"]
    assert rejected[0]["label_map"] is True
    m = write(fk, tmp_path / "out", labels=str(maps), allow_bad=1)
    assert m["splits"]["train"]["num_samples"] == len(fk.samples["train"]) - 1
    assert missing not in members(tmp_path / "out", "train")


def test_a_damaged_map_in_the_shards_is_named_by_verify(fk, tmp_path):
    maps = write_maps(tmp_path / "maps", fk.samples["train"])
    write(fk, tmp_path / "out", labels=str(maps))
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["wds"]["shards"][0]
    path = out / "wds" / shard["name"]
    with tarfile.open(path) as t:
        first = next(m for m in t if m.name.endswith(".tlm"))
    data = bytearray(path.read_bytes())
    data[first.offset_data: first.offset_data + 4] = b"XXXX"  # same size; checksum updated below
    path.write_bytes(bytes(data))
    shard["sha256"] = shards.sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    lines = []
    with pytest.raises(DataError, match="1 problems"):
        shard_verify.verify(out, workers=2, log=lines.append)
    key = first.name.split(".")[0]
    assert any(f"label map of {key} in the shards is not a map" in line for line in lines), lines


def beton_maps(out: Path, split: str) -> list[bytes] | None:
    """The `tlm` field of every sample of a split's .beton (index order), or None without the field."""
    from ffcv.reader import Reader

    path = out / "ffcv" / f"{split}.beton"
    r = Reader(str(path))
    if label_maps.MEMBER not in r.handlers:
        return None
    data = path.read_bytes()
    field = r.metadata[r.metadata.dtype.names[2]]
    return [data[int(p): int(p) + int(n)] for p, n in zip(field["ptr"], field["size"], strict=True)]


def wds_in_order(out: Path, split: str) -> list[dict[str, bytes]]:
    """The members of every sample of a split's wds shards, in sample-index order."""
    got = members(out, split)  # dicts keep insertion order: shard by shard, file order within
    shard_list = json.loads((out / "manifest.json").read_text())["splits"][split]["wds"]["shards"]
    assert [s["first_index"] for s in shard_list] == sorted(s["first_index"] for s in shard_list)
    return list(got.values())


def test_ffcv_stores_the_same_maps_at_the_same_indices_verified_and_resumable(fk, tmp_path):
    maps = write_maps(tmp_path / "maps", fk.samples["train"])
    out = tmp_path / "a"
    write(fk, out, labels=str(maps), formats=("wds", "ffcv"))
    assert beton_maps(out, "train") == [m["tlm"] for m in wds_in_order(out, "train")]
    assert beton_maps(out, "val") is None
    shard_verify.verify(out, workers=2, log=lambda *_: None)
    # deterministic and resumable as without maps: a re-run keeps the .beton, other workers give its bytes
    lines = []
    write(fk, out, labels=str(maps), formats=("wds", "ffcv"), log=lines.append)
    assert "complete, 0 images to process" in lines[0]
    write(fk, tmp_path / "b", labels=str(maps), formats=("ffcv",), workers=1)
    path = out / "ffcv" / "train.beton"
    assert (tmp_path / "b" / "ffcv" / "train.beton").read_bytes() == path.read_bytes()
    # a damaged map inside the .beton is named by its sample index
    data = bytearray(path.read_bytes())
    third = beton_maps(out, "train")[3]
    ptr = data.index(third)
    data[ptr: ptr + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["ffcv"]["sha256"] = shards.sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    lines = []
    with pytest.raises(DataError, match="1 problems"):
        shard_verify.verify(out, workers=2, log=lines.append)
    assert any("label map of sample index 3 in the shards is not a map" in line for line in lines), lines


def test_bad_labels_settings_are_one_line_errors(fk, tmp_path):
    with pytest.raises(DataError, match="LABELS=.*nowhere is not a folder"):
        write(fk, tmp_path / "out", labels=str(tmp_path / "nowhere"))


def test_undecodable_images_and_missing_maps_are_counted_apart(tmp_path):
    bad = fake.write(tmp_path / "fake", layouts=("folders",), num_classes=CLASSES, train_per_class=5,
                     val_per_class=2, min_side=16, max_side=24, quirks=False, bad=True, seed=3)
    good = sorted(k for k in bad.samples["train"] if k not in bad.bad["train"])
    maps = write_maps(tmp_path / "maps", bad.samples["train"], skip={good[0], good[1]})
    want = (r"^6 input files could not be decoded and 2 label maps \(LABELS\) are missing or damaged "
            r"\(.*\); remove or replace the files and write those maps .*--allow-bad 8 ")
    with pytest.raises(DataError, match=want):
        write(bad, tmp_path / "out", labels=str(maps))
    rejected = json.loads((tmp_path / "out" / "rejected.json").read_text())
    assert sorted(Path(r["path"]).stem for r in rejected if r.get("label_map")) == good[:2]
