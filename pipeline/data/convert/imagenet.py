"""ImageNet input layouts: detect what SRC holds and list every input file with its key and label.

Three layouts are recognised (see `detect`):

- ``folders``: ``SRC/train/<wnid>/*.JPEG`` and ``SRC/val/<wnid>/*.JPEG``.
- ``archives``: the original ``ILSVRC2012_img_train.tar`` (one nested tar per class) and
  ``ILSVRC2012_img_val.tar`` (flat), plus validation labels. The archives are never extracted:
  their member headers are indexed once and each image is later read with one ``pread`` at its
  offset inside the archive, so workers read in parallel straight from the tar files.
- ``flat-val``: ``SRC/train/<wnid>/`` folders and a flat ``SRC/val/`` folder, plus validation labels.
  Kaggle's copy (``SRC/ILSVRC/Data/CLS-LOC/{train,val}`` + ``SRC/LOC_val_solution.csv``) is this layout.

Validation labels come from the devkit (``ILSVRC2012_devkit_t12.tar.gz`` or its extracted folder:
``data/ILSVRC2012_validation_ground_truth.txt`` holds ILSVRC ids, which ``data/meta.mat`` maps to
WordNet ids) or from Kaggle's ``LOC_val_solution.csv``. Labels are indices into the sorted list of
train WordNet ids (0 = n01440764 on the full dataset), torchvision ImageFolder's order.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.errors import DataError

WNID_RE = re.compile(r"^n\d{8}$")
VAL_KEY_RE = re.compile(r"^ILSVRC2012_val_(\d{8})$")
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TGZ = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
KAGGLE_CSV = "LOC_val_solution.csv"
KAGGLE_ROOT = Path("ILSVRC") / "Data" / "CLS-LOC"
DEVKIT_GT = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"

EXPECTED = (
    "expected one of: (1) train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; "
    f"(2) {TRAIN_TAR} + {VAL_TAR} + ({DEVKIT_TGZ} or {KAGGLE_CSV}); "
    f"(3) train/<wnid>/ + a flat val/ folder + ({DEVKIT_TGZ} or {KAGGLE_CSV}); "
    f"Kaggle's {KAGGLE_ROOT}/ + {KAGGLE_CSV} is (3)"
)


@dataclass(frozen=True)
class InputFile:
    """One input file. `archive` is None for a plain file at `path`; otherwise the image is the
    `size` bytes at byte `offset` of the tar file `archive`, and `path` only names it for humans."""

    key: str
    label: int
    path: str
    size: int
    archive: str | None = None
    offset: int = 0


@dataclass
class ImageNetInput:
    path: str
    layout: str
    labels_from: str
    classes: list[str]
    splits: dict[str, list[InputFile]] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"path": self.path, "layout": self.layout, "labels": self.labels_from}


def read_input(entry: InputFile, _fds: dict[str, int] = {}) -> bytes:  # noqa: B006 (per-process fd cache)
    """The encoded bytes of one input file."""
    if entry.archive is None:
        with open(entry.path, "rb") as f:
            return f.read()
    fd = _fds.get(entry.archive)
    if fd is None:
        fd = _fds[entry.archive] = os.open(entry.archive, os.O_RDONLY)
    data = os.pread(fd, entry.size, entry.offset)
    if len(data) != entry.size:
        raise OSError(f"{entry.archive} ends before {entry.path} does (archive truncated)")
    return data


def detect(src: str | os.PathLike, expected_classes: int = 1000) -> ImageNetInput:
    """Recognise the layout of `src` and list every input file of both splits."""
    root = Path(src)
    if not root.exists():
        raise DataError(f"SRC {root} does not exist: pass the folder that holds your ImageNet copy")
    if not root.is_dir():
        raise DataError(f"SRC {root} is not a folder: pass the folder that holds your ImageNet copy")
    base = root / KAGGLE_ROOT if (root / KAGGLE_ROOT).is_dir() else root
    if (root / TRAIN_TAR).is_file() and (root / VAL_TAR).is_file():
        source = _from_archives(root)
    elif _is_class_tree(base / "train") and _is_class_tree(base / "val"):
        source = _from_folders(root, base)
    elif _is_class_tree(base / "train") and _is_flat(base / "val"):
        source = _from_flat_val(root, base)
    else:
        raise DataError(f"SRC {root} is not a recognised ImageNet layout: found {_found(root)}; {EXPECTED}")
    if len(source.classes) != expected_classes:
        raise DataError(
            f"SRC {root} has {len(source.classes)} classes in train, expected {expected_classes}: "
            f"pass --classes {len(source.classes)} if this subset is intended"
        )
    for split, entries in source.splits.items():
        if not entries:
            raise DataError(f"SRC {root}: the {split} split has no files")
    return source


def _found(root: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not names:
        return "an empty folder"
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"{len(names)} entries ({shown})"


def _is_class_tree(d: Path) -> bool:
    return d.is_dir() and any(p.is_dir() and WNID_RE.match(p.name) for p in d.iterdir())


def _is_flat(d: Path) -> bool:
    return d.is_dir() and any(p.is_file() and VAL_KEY_RE.match(p.stem) for p in d.iterdir())


def _files(d: Path, label: int = 0) -> list[InputFile]:
    """An entry per regular file in `d`, sorted by name (one stat per file: ImageNet has 1.3M)."""
    with os.scandir(d) as it:
        found = sorted((e.name, e.path, e.stat().st_size) for e in it if e.is_file())
    return [InputFile(key=Path(name).stem, label=label, path=path, size=size) for name, path, size in found]


def _class_dirs(d: Path) -> list[Path]:
    dirs = sorted(p for p in d.iterdir() if p.is_dir())
    bad = [p.name for p in dirs if not WNID_RE.match(p.name)]
    if bad:
        raise DataError(f"{d} holds folders that are not WordNet ids ({', '.join(bad[:5])}): move them out")
    return dirs


def _train_from_folders(base: Path) -> tuple[list[str], list[InputFile]]:
    dirs = _class_dirs(base / "train")
    classes = [d.name for d in dirs]
    entries = []
    for label, d in enumerate(dirs):
        found = _files(d, label)
        if not found:
            raise DataError(f"class folder {d} has no images: a class without training images cannot be "
                            f"learned (and shifts every later label); add its images or remove the folder")
        entries += found
    return classes, entries


def _from_folders(root: Path, base: Path) -> ImageNetInput:
    classes, train = _train_from_folders(base)
    index = {w: i for i, w in enumerate(classes)}
    val = []
    for d in _class_dirs(base / "val"):
        if d.name not in index:
            raise DataError(f"{d} is a class that train/ does not have: remove it or add train/{d.name}/")
        val += _files(d, index[d.name])
    return ImageNetInput(str(root), "folders", "folders", classes, {"train": train, "val": val})


def _from_flat_val(root: Path, base: Path) -> ImageNetInput:
    classes, train = _train_from_folders(base)
    val_wnid, labels_from = _val_labels(root)
    val = _files(base / "val")
    val = _label_val(val, val_wnid, classes, labels_from)
    return ImageNetInput(str(root), "flat-val", labels_from, classes, {"train": train, "val": val})


def _from_archives(root: Path) -> ImageNetInput:
    train_tar, val_tar = root / TRAIN_TAR, root / VAL_TAR
    per_class: dict[str, list[tuple[str, int, int]]] = {}
    with tarfile.open(train_tar, "r:") as outer:
        for member in outer:
            wnid = Path(member.name).stem
            if not member.isfile():
                continue
            if not (member.name.endswith(".tar") and WNID_RE.match(wnid)):
                raise DataError(f"{train_tar} holds {member.name}, expected only <wnid>.tar members")
            inner_file = outer.extractfile(member)
            with tarfile.open(fileobj=inner_file, mode="r:") as inner:
                per_class[wnid] = [
                    (m.name, member.offset_data + m.offset_data, m.size) for m in inner if m.isfile()
                ]
    classes = sorted(per_class)
    train = [
        InputFile(Path(name).stem, label, f"{train_tar}:{wnid}.tar:{name}", size, str(train_tar), offset)
        for label, wnid in enumerate(classes)
        for name, offset, size in sorted(per_class[wnid])
    ]
    with tarfile.open(val_tar, "r:") as t:
        val = [
            InputFile(Path(m.name).stem, 0, f"{val_tar}:{m.name}", m.size, str(val_tar), m.offset_data)
            for m in t
            if m.isfile()
        ]
    val.sort(key=lambda e: e.key)
    val_wnid, labels_from = _val_labels(root)
    val = _label_val(val, val_wnid, classes, labels_from)
    return ImageNetInput(str(root), "archives", labels_from, classes, {"train": train, "val": val})


def _label_val(entries: list[InputFile], val_wnid: dict[str, str], classes: list[str], labels_from: str):
    index = {w: i for i, w in enumerate(classes)}
    if len(val_wnid) != len(entries):
        raise DataError(
            f"label file ({labels_from}) has {len(val_wnid)} validation labels but the validation "
            f"set has {len(entries)} files: use the label file that belongs to this copy"
        )
    out = []
    for e in entries:
        wnid = val_wnid.get(e.key)
        if wnid is None:
            raise DataError(
                f"label file ({labels_from}) has no label for {e.path}: use the matching label file"
            )
        if wnid not in index:
            raise DataError(
                f"label file ({labels_from}) gives {e.key} the class {wnid}, which train/ does not have: "
                "use the matching label file"
            )
        out.append(InputFile(e.key, index[wnid], e.path, e.size, e.archive, e.offset))
    return out


def _val_labels(root: Path) -> tuple[dict[str, str], str]:
    """Validation key -> wnid, from the devkit (archive or folder) or Kaggle's CSV."""
    if (root / DEVKIT_TGZ).is_file():
        with tarfile.open(root / DEVKIT_TGZ, "r:gz") as t:
            members = {m.name.split("/", 1)[-1]: m for m in t if m.isfile()}
            missing = [n for n in (DEVKIT_GT, DEVKIT_META) if n not in members]
            if missing:
                raise DataError(f"{root / DEVKIT_TGZ} lacks {', '.join(missing)}: re-download the devkit")
            gt = t.extractfile(members[DEVKIT_GT]).read()
            meta = t.extractfile(members[DEVKIT_META]).read()
        return _devkit_labels(gt, meta, str(root / DEVKIT_TGZ)), "devkit"
    if (root / DEVKIT_DIR).is_dir():
        d = root / DEVKIT_DIR
        missing = [n for n in (DEVKIT_GT, DEVKIT_META) if not (d / n).is_file()]
        if missing:
            raise DataError(f"{d} lacks {', '.join(missing)}: re-download the devkit")
        return _devkit_labels((d / DEVKIT_GT).read_bytes(), (d / DEVKIT_META).read_bytes(), str(d)), "devkit"
    if (root / KAGGLE_CSV).is_file():
        return _kaggle_labels(root / KAGGLE_CSV), "kaggle-csv"
    raise DataError(
        f"SRC {root} has no validation labels: put {DEVKIT_TGZ} (or {KAGGLE_CSV}) into {root}"
    )


def _devkit_labels(gt: bytes, meta: bytes, where: str) -> dict[str, str]:
    import scipy.io

    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {
            int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0
        }
    except Exception as e:
        raise DataError(f"{where}: cannot read {DEVKIT_META} ({e}): re-download the devkit") from e
    labels = {}
    for i, line in enumerate(gt.decode().split(), start=1):
        if not line.isdigit() or int(line) not in id_to_wnid:
            raise DataError(
                f"{where}: line {i} of {DEVKIT_GT} is {line!r}, not an ILSVRC id of {DEVKIT_META}"
            )
        labels[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[int(line)]
    return labels


def _kaggle_labels(path: Path) -> dict[str, str]:
    labels = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["ImageId", "PredictionString"]:
            raise DataError(f"{path} starts with {header}, expected the header ImageId,PredictionString")
        for n, row in enumerate(reader, start=2):
            wnid = row[1].split()[0] if len(row) == 2 and row[1].split() else ""
            if not WNID_RE.match(wnid):
                raise DataError(f"{path} line {n} has no WordNet id: {','.join(row)[:80]!r}")
            labels[row[0]] = wnid
    return labels
