"""The shards folder's `manifest.json`: its name, version and layout, read and built in this one place.

    {"format_version": 1, "classes": [wnid, ...], "options": {...}, "source": {path, layout, labels},
     "splits": {"train" | "val": {"files_found", "num_samples", "rejected", "converted",
                                  ["label_maps": {member, encoding}] (written with LABELS),
                                  "wds": {"shards": [{name, num_samples, bytes, sha256, first_index}],
                                          "num_samples", "bytes"},
                                  "ffcv": {name, num_samples, bytes, sha256}}}}

A split holds one section per format written (`pipeline.data.formats`); the writer
(`pipeline.data.convert.shards`), the verifier and both loaders read the manifest through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.data.errors import DataError

NAME = "manifest.json"
FORMAT_VERSION = 1


def path(root: str | os.PathLike) -> Path:
    return Path(root) / NAME


def build(classes: list[str], options: dict, source: dict, splits: dict) -> dict:
    """The manifest of a complete shards folder (`splits`: split name -> split section)."""
    return {"format_version": FORMAT_VERSION, "classes": classes, "options": options, "source": source,
            "splits": splits}


def read(root: str | os.PathLike, setting: str = "data.root") -> dict:
    """The manifest of the shards folder `root`, checked for its version; `setting` names `root` in errors."""
    file = os.path.join(root, NAME)
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{setting}={str(root)!r} has no manifest.json; write shards there first "
                        f"(make shards SRC=... OUT={root})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{file} is not valid JSON ({e}); rebuild the shards (make shards)") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{file}: format_version {manifest.get('format_version')!r} is not supported "
                        f"(expected {FORMAT_VERSION}); rebuild the shards with this version")
    return manifest


def split_section(manifest: dict, root: str, split: str, fmt: str) -> dict:
    """The non-empty section of `split` in a manifest that holds format `fmt` for it."""
    section = manifest.get("splits", {}).get(split)
    if section is None:
        raise DataError(f"{root}/manifest.json has no '{split}' split; rebuild the shards (make shards)")
    if fmt not in section:
        from pipeline.data.formats import FORMATS

        have = [f for f in FORMATS if f in section]
        raise DataError(f"{root}/manifest.json: split '{split}' was not written in format "
                        f"'{fmt}'; set data.format to one of {have} "
                        f"or rebuild with make shards FORMATS='wds ffcv'")
    if int(section["num_samples"]) < 1:
        raise DataError(f"{root}/manifest.json: split '{split}' is empty; rebuild the shards")
    return section
