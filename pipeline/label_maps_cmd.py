"""The `label-maps` command: TokenLabeling label maps of every ImageNet train image, from any teacher.

    python -m pipeline label-maps --teacher rmt_l_tl.pth --config configs/rmt_l_tl.yaml \\
        --src /data/imagenet --out maps/
    python -m pipeline label-maps --teacher dm_nfnet_f6 --pretrained --src /data/imagenet --out maps/

writes `<out>/<wnid>/<key>.pt`, an fp16 tensor [2, k, H, W] (top-k logits, their class indices) per
train image, the layout of TokenLabeling's `label_top5_train_nfnet` (`pipeline.data.label_maps`), so
`make shards LABELS=<out>` reads either. The teacher is a timm model name with timm's pretrained
weights (`--pretrained`; TokenLabeling's was dm_nfnet_f6 at 576 px), one of our runs / checkpoints,
or a weights file (official .pth, our exported .safetensors) with the `--config` naming its model.
Its logits per final-stage position: a token-labeling RMT's `aux_head` (TokenLabeling's dense head,
the one trained to predict each token's class; its class head is trained on the pooled output
only), a plain RMT's own head without pooling (`global_pool=""`), other timm models' Linear
classifier applied to every position of their NCHW features. Unlike TokenLabeling (shorter side
resized, then a centre crop), the whole image is resized to the teacher's square input, so the map
covers exactly the image the crop boxes refer to. Resumable: images whose map exists are skipped, and
each map is written under a temporary name and renamed, so a killed run leaves only complete files.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data import label_maps
from pipeline.data.convert.imagenet import detect, read_input
from pipeline.data.errors import DataError
from pipeline.data.load.augment import IMAGENET_MEAN, IMAGENET_STD


def load_teacher(teacher: str, num_classes: int, pretrained: bool, ema: bool,
                 config: str | None = None) -> torch.nn.Module:
    """A timm model name, or a run dir / checkpoint dir / weights file of ours (`pipeline.train.weights`;
    a weights file needs `config`, the recipe naming its model)."""
    import timm

    import pipeline.models  # noqa: F401 (registers RMT)

    if Path(teacher).exists():
        from pipeline.train.weights import checked_weights, resolve_source

        source = resolve_source(teacher, config)
        model = checked_weights(source, ema, source.config())
    elif timm.is_model(teacher):
        if pretrained and not _has_pretrained(teacher):
            raise DataError(f"--teacher {teacher} --pretrained: timm has no pretrained weights for "
                            f"{teacher}; give a weights file and its recipe instead (e.g. --teacher "
                            f"rmt_l_tl.pth --config configs/rmt_l_tl.yaml) or a run of ours")
        model = timm.create_model(teacher, pretrained=pretrained, num_classes=num_classes)
    else:
        raise DataError(f"--teacher {teacher}: neither a path nor a timm model name; give e.g. dm_nfnet_f6 "
                        "--pretrained, a weights file with its --config, or a run dir of ours")
    if model.num_classes != num_classes:
        raise DataError(f"--teacher {teacher} has {model.num_classes} classes, SRC has {num_classes}; "
                        "give a teacher for these classes")
    return model.eval()


def _has_pretrained(name: str) -> bool:
    """Whether timm knows where to get pretrained weights for model `name`."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg is not None and bool(cfg.url or cfg.hf_hub_id or cfg.file)


def position_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, classes, H, W) logits at every final-stage position of the teacher (see the module docstring)."""
    from pipeline.models.rmt import RMT

    if isinstance(model, RMT) and model.aux_head is not None:  # token labeling: its per-token head
        return model.aux_head(model.forward_features(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if isinstance(model, RMT):  # its own head without pooling (timm's un-pooled convention)
        pool, model.global_pool = model.global_pool, ""
        try:
            return model.forward_head(model.forward_features(x))
        finally:
            model.global_pool = pool
    feats = model.forward_features(x)
    head = model.get_classifier()
    if feats.ndim != 4 or not isinstance(head, torch.nn.Linear) or head.in_features != feats.shape[1]:
        raise DataError(f"teacher {type(model).__name__} has no classifier that applies per position "
                        "(NCHW features + a Linear head); pick a CNN teacher or an RMT")
    return head(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def teacher_input(data: bytes, size: int) -> torch.Tensor:
    """The whole image resized to size x size (bicubic), normalised with the ImageNet mean and std."""
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _save(path: Path, value: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)


def generate(teacher: str, src: str, out: str, classes: int = 1000, img_size: int = 576, batch_size: int = 32,
             top_k: int = label_maps.TOP_K, pretrained: bool = False, ema: bool = False, device: str = "cpu",
             progress: bool = True, log=print, config: str | None = None) -> dict:
    """Write the maps (see module docstring); returns counts {"written", "skipped", "bad"}."""
    if top_k > classes:
        raise DataError(f"--top-k {top_k}: SRC has only {classes} classes; give at most {classes}")
    entries = detect(src, classes).splits["train"]
    todo = [e for e in entries if not label_maps.map_path(out, e.key).is_file()]
    log(f"label-maps: {len(entries)} train images, {len(entries) - len(todo)} maps already written, "
        f"{len(todo)} to write with teacher {teacher} at {img_size} px")
    model = load_teacher(teacher, classes, pretrained, ema, config).to(device)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="label-maps", dynamic_ncols=True)
    bad = 0
    try:
        for lo in range(0, len(todo), batch_size):
            batch, images = [], []
            for e in todo[lo:lo + batch_size]:
                try:
                    images.append(teacher_input(read_input(e), img_size))
                    batch.append(e)
                except (OSError, ValueError, Image.DecompressionBombError):
                    bad += 1  # `shards` rejects (and lists) the same file
            if batch:
                with torch.no_grad():
                    logits = position_logits(model, torch.stack(images).to(device)).float()
                values, indices = logits.topk(top_k, dim=1)
                for e, v, i in zip(batch, values.cpu(), indices.cpu(), strict=True):
                    _save(label_maps.map_path(out, e.key), torch.stack([v, i.float()]).half())
            if bar is not None:
                bar.update(len(todo[lo:lo + batch_size]))
    finally:
        if bar is not None:
            bar.close()
    counts = {"written": len(todo) - bad, "skipped": len(entries) - len(todo), "bad": bad}
    log(f"label-maps: wrote {counts['written']} maps into {out} ({bad} undecodable images skipped)")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True,
                        help="timm model name (with --pretrained), a run dir / checkpoint of ours, or a "
                             "weights file (.pth, .safetensors) with --config")
    parser.add_argument("--config", help="config YAML naming the teacher's model (needed for a weights file; "
                                         "default for a run: its config.yaml)")
    parser.add_argument("--src", required=True, help="ImageNet copy (any layout `shards` reads)")
    parser.add_argument("--out", required=True, help="output folder: <out>/<wnid>/<key>.pt")
    parser.add_argument("--classes", type=int, default=1000,
                        help="number of classes of SRC (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=576,
                        help="teacher input side; TokenLabeling used NFNet-F6 at 576 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per teacher call (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=label_maps.TOP_K, help="classes kept per position")
    parser.add_argument("--pretrained", action="store_true", help="timm teacher: load its pretrained weights")
    parser.add_argument("--ema", action="store_true", help="our checkpoint as teacher: use its EMA weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    generate(args.teacher, args.src, args.out, classes=args.classes, img_size=args.img_size,
             batch_size=args.batch_size, top_k=args.top_k, pretrained=args.pretrained, ema=args.ema,
             device=args.device, progress=not args.no_progress, config=args.config)
    return 0
