"""Fake ImageNet: a small, learnable dataset written in every real ImageNet layout, quirks included.

Each class is a visually distinct pattern (a shape, a colour and a texture, drawn at a random place,
size and angle on a random background), so a tiny model learns it in minutes on a CPU; it is the
demo's dataset. The same images are written in every layout `pipeline.data.convert.imagenet` reads:

    OUT/folders/   train/<wnid>/<wnid>_<n>.JPEG, val/<wnid>/ILSVRC2012_val_<n>.JPEG
    OUT/archives/  ILSVRC2012_img_train.tar (nested <wnid>.tar), ILSVRC2012_img_val.tar (flat),
                   ILSVRC2012_devkit_t12.tar.gz (validation ground truth + meta.mat)
    OUT/flat-val/  train/<wnid>/..., a flat val/, ILSVRC2012_devkit_t12.tar.gz
    OUT/kaggle/    ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}, LOC_val_solution.csv, LOC_synset_mapping.txt

Quirks of the real dataset are present in both splits: a CMYK JPEG, a grayscale JPEG and a PNG
named .JPEG. With `bad=True` each split also gets a truncated, a zero-byte and an undecodable file.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import math
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.convert import imagenet as sources

LAYOUTS = ("folders", "archives", "flat-val", "kaggle")
SHAPES = ("disc", "square", "triangle", "ring", "cross", "star")
COLOURS = ((220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 200, 30), (160, 50, 200), (20, 190, 200),
           (250, 120, 20))
TEXTURES = ("solid", "stripes", "checks")
QUIRKS = ("cmyk", "gray", "png")
BAD = ("truncated", "zero-byte", "undecodable")


@dataclass
class FakeImageNet:
    """What was written: classes in label order, and the keys of each quirky or bad file per split."""

    root: Path
    classes: list[str]
    samples: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> key -> label
    quirks: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> key -> quirk
    bad: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> key -> kind


def wnids(n: int, seed: int = 0) -> list[str]:
    """`n` distinct, sorted, real-looking WordNet ids."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1_000_000, 5_000_000), size=n, replace=False)
    return sorted(f"n0{i:07d}" for i in ids)


def render(label: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One RGB image of class `label`: its shape, colour and texture over a random background."""
    shape = SHAPES[label % len(SHAPES)]
    colour = np.array(COLOURS[label % len(COLOURS)])
    texture = TEXTURES[(label // (len(SHAPES) * len(COLOURS))) % len(TEXTURES)]
    bg = rng.integers(70, 190) + rng.integers(-15, 16, size=3)  # a greyish background
    noise = rng.normal(0, 12, size=(height, width, 1))
    pixels = np.clip(bg + noise + rng.normal(0, 6, size=(height, width, 3)), 0, 255)

    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    side = min(width, height)
    r = side * rng.uniform(0.25, 0.45)
    cx = rng.uniform(r, width - r)
    cy = rng.uniform(r, height - r)
    angle = rng.uniform(0, 2 * math.pi)

    def poly(points: int, radii: list[float]) -> list[tuple[float, float]]:
        return [
            (cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / points),
             cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / points))
            for k in range(points)
        ]

    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=0)
    elif shape == "square":
        draw.polygon(poly(4, [r]), fill=255)
    elif shape == "triangle":
        draw.polygon(poly(3, [r]), fill=255)
    elif shape == "star":
        draw.polygon(poly(10, [r, r * 0.45]), fill=255)
    else:  # cross: two bars
        w = r / 3
        for a in (angle, angle + math.pi / 2):
            dx, dy, ex, ey = r * math.cos(a), r * math.sin(a), w * -math.sin(a), w * math.cos(a)
            draw.polygon([(cx - dx - ex, cy - dy - ey), (cx + dx - ex, cy + dy - ey),
                          (cx + dx + ex, cy + dy + ey), (cx - dx + ex, cy - dy + ey)], fill=255)

    yy, xx = np.mgrid[0:height, 0:width]
    period = max(4, side // 12)
    if texture == "stripes":
        pattern = ((xx + yy) // period) % 2
    elif texture == "checks":
        pattern = ((xx // period) + (yy // period)) % 2
    else:
        pattern = np.ones((height, width), dtype=np.int64)
    fg = colour * (0.55 + 0.45 * pattern[..., None]) + rng.normal(0, 8, size=(height, width, 3))
    m = (np.asarray(mask, dtype=np.float64) / 255.0)[..., None]
    out = np.clip(pixels * (1 - m) + fg * m, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def _encode(img: Image.Image, quirk: str | None, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    if quirk == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=90)
    elif quirk == "gray":
        img.convert("L").save(buf, "JPEG", quality=90)
    elif quirk == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def _bad_bytes(kind: str, good: bytes, rng: np.random.Generator) -> bytes:
    if kind == "truncated":  # cut in the middle of the compressed scan, after all headers
        scan = good.find(b"\xff\xda")
        return good[: scan + (len(good) - scan) // 2]
    if kind == "zero-byte":
        return b""
    return rng.integers(0, 256, size=2000, dtype=np.uint8).tobytes()  # undecodable


def generate(num_classes: int = 10, train_per_class: int = 20, val_per_class: int = 5,
             min_side: int = 200, max_side: int = 500, large_fraction: float = 0.05,
             quirks: bool = True, bad: bool = False, seed: int = 0):
    """The files of a fake ImageNet: (classes, {split: [(key, label, bytes)]}, quirks, bad)."""
    if num_classes < 1 or train_per_class < 1 or val_per_class < 1:
        raise sources.DataError("fake ImageNet needs at least 1 class and 1 image per class and split")
    if not 8 <= min_side <= max_side:
        raise sources.DataError(f"image sides {min_side}..{max_side}: need 8 <= min-side <= max-side")
    rng = np.random.default_rng(seed)
    classes = wnids(num_classes, seed)
    files: dict[str, list[tuple[str, int, bytes]]] = {"train": [], "val": []}
    quirk_of: dict[str, dict[str, str]] = {"train": {}, "val": {}}
    bad_of: dict[str, dict[str, str]] = {"train": {}, "val": {}}
    val_labels = rng.permutation(np.repeat(np.arange(num_classes), val_per_class))
    plan = {
        "train": [(label, f"{classes[label]}_{n}") for label in range(num_classes)
                  for n in sorted(rng.choice(20000, size=train_per_class, replace=False) + 1)],
        "val": [(int(label), f"ILSVRC2012_val_{i + 1:08d}") for i, label in enumerate(val_labels)],
    }
    for split, items in plan.items():
        special = rng.permutation(len(items))
        quirky = {int(special[k]): q for k, q in enumerate(QUIRKS) if quirks and k < len(items)}
        broken = {int(special[-1 - k]): b for k, b in enumerate(BAD)
                  if bad and len(items) - 1 - k >= len(QUIRKS)}
        for i, (label, key) in enumerate(items):
            big = rng.random() < large_fraction
            hi = max_side * 2 if big else max_side
            width, height = (int(v) for v in rng.integers(min_side, hi + 1, size=2))
            img = render(label, rng, width, height)
            data = _encode(img, quirky.get(i), rng)
            if i in quirky:
                quirk_of[split][key] = quirky[i]
            if i in broken:
                data = _bad_bytes(broken[i], data, rng)
                bad_of[split][key] = broken[i]
            files[split].append((key, label, data))
    return classes, files, quirk_of, bad_of


def write(out: str | os.PathLike, layouts=LAYOUTS, **kwargs) -> FakeImageNet:
    """Write a fake ImageNet under `out`, one complete SRC folder per layout (see module docstring)."""
    root = Path(out)
    classes, files, quirk_of, bad_of = generate(**kwargs)
    seed = kwargs.get("seed", 0)
    for layout in layouts:
        if layout not in LAYOUTS:
            raise sources.DataError(f"unknown fake layout {layout!r}: choose from {', '.join(LAYOUTS)}")
        d = root / layout
        d.mkdir(parents=True, exist_ok=True)
        if layout == "folders":
            _write_class_tree(d / "train", files["train"], classes)
            _write_class_tree(d / "val", files["val"], classes)
        elif layout == "flat-val":
            _write_class_tree(d / "train", files["train"], classes)
            _write_flat(d / "val", files["val"])
            _write_devkit(d, files["val"], classes, seed)
        elif layout == "kaggle":
            base = d / sources.KAGGLE_ROOT
            _write_class_tree(base / "train", files["train"], classes)
            _write_flat(base / "val", files["val"])
            _write_kaggle_csv(d, files["val"], classes, seed)
        else:
            _write_archives(d, files, classes)
            _write_devkit(d, files["val"], classes, seed)
    samples = {s: {k: label for k, label, _ in fs} for s, fs in files.items()}
    return FakeImageNet(root, classes, samples, quirk_of, bad_of)


def _write_class_tree(d: Path, items, classes: list[str]) -> None:
    for wnid in classes:
        (d / wnid).mkdir(parents=True, exist_ok=True)
    for key, label, data in items:
        (d / classes[label] / f"{key}.JPEG").write_bytes(data)


def _write_flat(d: Path, items) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for key, _, data in items:
        (d / f"{key}.JPEG").write_bytes(data)


def _add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    t.addfile(info, io.BytesIO(data))


def _write_archives(d: Path, files, classes: list[str]) -> None:
    with tarfile.open(d / sources.TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        for label, wnid in enumerate(classes):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as inner:
                for key, lab, data in files["train"]:
                    if lab == label:
                        _add(inner, f"{key}.JPEG", data)
            _add(outer, f"{wnid}.tar", buf.getvalue())
    with tarfile.open(d / sources.VAL_TAR, "w", format=tarfile.GNU_FORMAT) as t:
        for key, _, data in files["val"]:
            _add(t, f"{key}.JPEG", data)


def _write_devkit(d: Path, val, classes: list[str], seed: int) -> None:
    """The devkit's ground truth (ILSVRC ids, in val file order) and meta.mat; ILSVRC ids are not
    in sorted-wnid order (as in the real devkit) and meta.mat also holds non-leaf synsets."""
    import scipy.io

    rng = np.random.default_rng(seed + 1)
    ids = rng.permutation(len(classes)) + 1  # ILSVRC id of classes[i]
    if len(classes) > 1 and (ids == np.arange(1, len(classes) + 1)).all():
        ids = np.roll(ids, 1)  # never the sorted order, or a mix-up of ids and labels would go unseen
    extra = [f"n0{9_000_000 + k:07d}" for k in range(2)]  # internal nodes (num_children > 0)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(classes) + len(extra), 1), dtype=[(f, "O") for f in fields])
    rows = sorted(zip(ids.tolist(), classes, strict=True))
    rows += [(len(classes) + 1 + k, w) for k, w in enumerate(extra)]
    for r, (ilsvrc_id, wnid) in enumerate(rows):
        leaf = r < len(classes)
        synsets[r, 0] = (np.array([[ilsvrc_id]], dtype=np.uint16), np.array([wnid]),
                         np.array([f"fake class {wnid}"]), np.array(["a fake class"]),
                         np.array([[0 if leaf else 2]], dtype=np.uint8),
                         np.zeros((1, 0), dtype=np.uint16) if leaf else np.array([[1, 2]], dtype=np.uint16),
                         np.array([[0 if leaf else 1]], dtype=np.uint8), np.array([[0]], dtype=np.uint16))
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    id_of = dict(zip(classes, ids.tolist(), strict=True))
    gt = "".join(f"{id_of[classes[label]]}\n" for _, label, _ in val).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        _add(t, f"{sources.DEVKIT_DIR}/{sources.DEVKIT_GT}", gt)
        _add(t, f"{sources.DEVKIT_DIR}/{sources.DEVKIT_META}", meta.getvalue())
    with open(d / sources.DEVKIT_TGZ, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())


def _write_kaggle_csv(d: Path, val, classes: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed + 2)
    with open(d / sources.KAGGLE_CSV, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ImageId", "PredictionString"])
        for i in rng.permutation(len(val)):
            key, label, _ = val[i]
            x0, y0 = rng.integers(0, 100, size=2)
            box = f"{classes[label]} {x0} {y0} {x0 + 50} {y0 + 60}"
            w.writerow([key, f"{box} {box}"])
    with open(d / "LOC_synset_mapping.txt", "w") as f:
        f.writelines(f"{wnid} fake class {wnid}\n" for wnid in classes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/fake-imagenet", help="output folder (default: %(default)s)")
    parser.add_argument("--layouts", nargs="+", default=["folders"], choices=[*LAYOUTS, "all"],
                        help="layouts to write, each into OUT/<layout>/ (default: folders)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=40, help="default: %(default)s")
    parser.add_argument("--val-per-class", type=int, default=10, help="default: %(default)s")
    parser.add_argument("--min-side", type=int, default=200,
                        help="smallest image side in px (default: %(default)s)")
    parser.add_argument("--max-side", type=int, default=500,
                        help="largest usual side in px; a few get up to twice it (default: %(default)s)")
    parser.add_argument("--no-quirks", action="store_true",
                        help="no CMYK, grayscale or PNG-named-.JPEG files")
    parser.add_argument("--bad", action="store_true", help="add truncated, zero-byte and undecodable files")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")


def run(args: argparse.Namespace) -> int:
    layouts = LAYOUTS if "all" in args.layouts else tuple(args.layouts)
    fake = write(args.out, layouts, num_classes=args.classes, train_per_class=args.train_per_class,
                 val_per_class=args.val_per_class, min_side=args.min_side, max_side=args.max_side,
                 quirks=not args.no_quirks, bad=args.bad, seed=args.seed)
    counts = ", ".join(f"{len(s)} {split}" for split, s in fake.samples.items())
    print(f"fake ImageNet: {len(fake.classes)} classes, {counts} images in {', '.join(layouts)} "
          f"under {fake.root}")
    for layout in layouts:
        print(f"  make shards SRC={fake.root / layout} CLASSES={len(fake.classes)}")
    return 0
