"""Token-labeling label maps: TokenLabeling's per-image `.pt` files, their shard encoding, their geometry.

A map is what TokenLabeling's `generate_label.py` saves per training image: an fp16 tensor
[2, k, H, W] (k = 5) holding, at every position of the teacher's output grid, the top-k class
scores (logits) and their class indices, at `<dir>/<wnid>/<file stem>.pt` (`label_top5_train_nfnet`:
NFNet-F6 at 576 px). In the shards a map is one compact member (`encode` / `decode`: scores fp16,
indices uint16).

Geometry: every spatial augmentation of the image is an affine map of continuous pixel coordinates
(edges at integers, as PIL's resize box and affine transforms use them), so the whole chain from the
final crop back to the label map is one 3x3 matrix (`sample_affine`): the RandomResizedCrop box and
resize, the horizontal flip and RandAugment's geometric ops (Rotate, ShearX/Y, TranslateX/Y[Rel],
with PIL's own matrices); colour ops leave the map alone. `targets` then builds TokenLabeling's
targets from the maps on any device: scatter the top-k scores into a dense [C, H, W] map, average
bilinear samples over each cell of the token grid (RoIAlign, generalised to affine boxes; for a plain
crop it equals `torchvision.ops.roi_align`, which tests check), softmax over the classes, smoothing
as `t * on + off` (TokenLabeling's `mixup_target`). Points that a geometric op brings in from
outside the image get score 0 (TokenLabeling fills constant 0 there too).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.errors import DataError

TOP_K = 5
MAGIC = b"TLM1"
_HEADER = struct.Struct("<4sHHH")  # magic, k, H, W
MEMBER = "tlm"  # WebDataset member extension / .beton field name of a map
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


# ---------------------------------------------------------------- files and their validation

def map_path(root: str | os.PathLike, key: str) -> Path:
    """TokenLabeling's layout: `<root>/<wnid>/<key>.pt` for a train key `<wnid>_<n>`."""
    return Path(root) / key.split("_")[0] / f"{key}.pt"


def validate(m, key: str, num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores fp16 [k, H, W], indices uint16 [k, H, W]) of a map, or a one-line DataError naming `key`."""
    bad = f"label map of {key} ({where})"
    if not isinstance(m, torch.Tensor) or m.ndim != 4 or m.shape[0] != 2 or min(m.shape) < 1:
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise DataError(f"{bad} is {shape}, not a tensor [2, k, H, W] (top-k scores, class indices); "
                        "regenerate it (python -m pipeline label-maps)")
    if m.shape[2] > 0xFFFF or m.shape[3] > 0xFFFF or m.shape[1] > 0xFFFF:
        raise DataError(f"{bad} is {tuple(m.shape)}: too large; regenerate it")
    scores, idx = m[0].float(), m[1].float()
    if not torch.isfinite(scores).all():
        raise DataError(f"{bad} has non-finite scores; regenerate it")
    if (idx != idx.round()).any() or idx.min() < 0 or idx.max() >= num_classes:
        raise DataError(f"{bad} has class indices outside 0..{num_classes - 1}; regenerate it for "
                        f"{num_classes} classes")
    return scores.half().numpy(), idx.to(torch.int64).numpy().astype(np.uint16)


def read_pt(root: str | os.PathLike, key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The validated map of training image `key` under `root` (see `validate`)."""
    path = map_path(root, key)
    try:
        m = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"no label map for {key}: {path} is missing; generate the maps "
                        "(python -m pipeline label-maps) or accept it with --allow-bad") from None
    except Exception as e:  # torch.load raises many types for damaged files
        raise DataError(f"label map of {key} ({path}) cannot be read ({type(e).__name__}); "
                        "regenerate it") from None
    return validate(m, key, num_classes, str(path))


def encode(scores: np.ndarray, indices: np.ndarray) -> bytes:
    """The compact shard member of a map: header, fp16 scores, uint16 indices."""
    k, h, w = scores.shape
    return (_HEADER.pack(MAGIC, k, h, w) + np.ascontiguousarray(scores, "<f2").tobytes()
            + np.ascontiguousarray(indices, "<u2").tobytes())


def decode(data: bytes, key: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """(scores fp16 [k, H, W], indices uint16 [k, H, W]) of a shard member."""
    if len(data) < _HEADER.size or data[:4] != MAGIC:
        raise DataError(f"label map of {key} in the shards is not a map; rebuild the shards with LABELS")
    _, k, h, w = _HEADER.unpack_from(data)
    n = k * h * w
    if len(data) != _HEADER.size + 4 * n:
        raise DataError(f"label map of {key} in the shards has {len(data)} bytes, expected "
                        f"{_HEADER.size + 4 * n}; rebuild the shards")
    scores = np.frombuffer(data, "<f2", n, _HEADER.size).reshape(k, h, w)
    indices = np.frombuffer(data, "<u2", n, _HEADER.size + 2 * n).reshape(k, h, w)
    return scores, indices


# ---------------------------------------------------------------- geometry

def _affine(a, b, c, d, e, f) -> np.ndarray:
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


def _op_coeffs(name: str, arg: float, width: int, height: int) -> tuple[float, ...] | None:
    """The top two rows (a, b, c, d, e, f) of `op_matrix`, as plain floats."""
    if name == "Rotate":  # PIL Image.rotate(arg) about the centre, expand=False
        t = -math.radians(arg)
        cos, sin = round(math.cos(t), 15), round(math.sin(t), 15)
        cx, cy = width / 2.0, height / 2.0
        return cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy
    if name == "ShearX":
        return 1.0, arg, 0.0, 0.0, 1.0, 0.0
    if name == "ShearY":
        return 1.0, 0.0, 0.0, arg, 1.0, 0.0
    if name in ("TranslateX", "TranslateXRel"):
        return 1.0, 0.0, arg * (width if name.endswith("Rel") else 1), 0.0, 1.0, 0.0
    if name in ("TranslateY", "TranslateYRel"):
        return 1.0, 0.0, 0.0, 0.0, 1.0, arg * (height if name.endswith("Rel") else 1)
    return None


def op_matrix(name: str, arg: float, width: int, height: int) -> np.ndarray | None:
    """PIL's output -> input matrix of timm's RandAugment op `name` with argument `arg` on a
    width x height image, or None for an op that moves no pixel (the colour ops)."""
    coeffs = _op_coeffs(name, arg, width, height)
    return None if coeffs is None else _affine(*coeffs)


def sample_affine(box, flip: bool, ops: list[tuple[str, float]], image_hw: tuple[int, int],
                  out_hw: tuple[int, int], map_hw: tuple[int, int]) -> np.ndarray:
    """[2, 3, 3]: the matrices from unit-square coordinates (x, y in [0, 1]) of the augmented output
    image to (0) unit-square coordinates of the flipped crop before RandAugment (points outside it are
    RandAugment's fill) and from those to (1) label-map pixel coordinates, for the crop `box` (top,
    left, height, width) of an image of `image_hw`, resized to `out_hw`, then flipped (if `flip`),
    then the RandAugment `ops` (name, argument) in order; `map_hw` is the map's (H, W)."""
    return np.array(sample_affine_rows(box, flip, ops, image_hw, out_hw, map_hw))


def sample_affine_rows(box, flip: bool, ops: list[tuple[str, float]], image_hw: tuple[int, int],
                       out_hw: tuple[int, int], map_hw: tuple[int, int]) -> list:
    """`sample_affine` as nested lists of floats, computed without numpy: per sample, numpy's call
    overhead on 3 x 3 matrices was most of what the maps cost the loader (BENCHMARKS.md)."""
    top, left, h, w = box
    oh, ow = out_hw
    a, b, c, d, e, f = 1.0, 0.0, 0.0, 0.0, 1.0, 0.0  # RandAugment, output px -> its input px
    for name, arg in ops:  # output of op i -> its input: applied in order, composed on the right
        op = _op_coeffs(name, arg, ow, oh)
        if op is not None:
            a2, b2, c2, d2, e2, f2 = op
            a, b, c, d, e, f = (a * a2 + b * d2, a * b2 + b * e2, a * c2 + b * f2 + c,
                                d * a2 + e * d2, d * b2 + e * e2, d * c2 + e * f2 + f)
    sx, sy = map_hw[1] / image_hw[1], map_hw[0] / image_hw[0]  # image px -> map px
    # (0) diag(1/ow, 1/oh, 1) @ RandAugment @ diag(ow, oh, 1); (1) unit square -> output px -> flip
    # (x -> ow - x) -> crop px -> image px -> map px
    return [[[a, b * oh / ow, c / ow], [d * ow / oh, e, f / oh], [0.0, 0.0, 1.0]],
            [[-sx * w if flip else sx * w, 0.0, sx * (left + w if flip else left)], [0.0, sy * h, sy * top],
             [0.0, 0.0, 1.0]]]


def dense_scores(scores: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, C, H, W] fp32 maps with each position's top-k scores at their classes, 0 elsewhere."""
    b, _, h, w = scores.shape
    out = torch.zeros(b, num_classes, h, w, device=scores.device)
    return out.scatter_(1, indices.long(), scores.float())


def sample_grid(maps: torch.Tensor, theta: torch.Tensor, grid_hw: tuple[int, int],
                samples: int = 2) -> torch.Tensor:
    """[B, C, gh, gw]: per cell of a gh x gw grid over the output's unit square, the mean of
    samples x samples bilinear samples of `maps` [B, C, H, W] at the points `theta` [B, 2, 3, 3]
    (`sample_affine`) maps them to (RoIAlign with affine boxes); points that RandAugment brings in
    from outside the crop, or that fall outside the map, count 0."""
    b, _, h, w = maps.shape
    gh, gw = grid_hw
    ys = (torch.arange(gh * samples, device=maps.device, dtype=torch.float64) + 0.5) / (gh * samples)
    xs = (torch.arange(gw * samples, device=maps.device, dtype=torch.float64) + 0.5) / (gw * samples)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([xx, yy, torch.ones_like(xx)], -1).reshape(1, -1, 3)  # (1, P, 3)
    theta = theta.to(maps.device, torch.float64)
    pre = pts @ theta[:, 0].transpose(1, 2)  # (B, P, 3): unit coordinates before RandAugment
    mapped = pre @ theta[:, 1].transpose(1, 2)
    x, y = mapped[..., 0], mapped[..., 1]
    inside = ((pre[..., :2] >= 0) & (pre[..., :2] <= 1)).all(-1) & (x >= 0) & (x <= w) & (y >= 0) & (y <= h)
    inside = inside.to(maps.dtype)
    grid = torch.stack([2 * x / w - 1, 2 * y / h - 1], -1).to(maps.dtype)
    grid = grid.reshape(b, gh * samples, gw * samples, 2)
    values = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    values = values * inside.reshape(b, 1, gh * samples, gw * samples)
    return F.avg_pool2d(values, samples)


def targets(scores: torch.Tensor, indices: torch.Tensor, theta: torch.Tensor, grid_hw: tuple[int, int],
            num_classes: int, smoothing: float = 0.1, samples: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenLabeling's (class target [B, C], dense target [B, gh * gw, C], raster order) of a batch of
    maps (scores, indices [B, k, H, W]) seen through `theta` [B, 2, 3, 3] (`sample_affine`).

    The class target is the softmax of the mean over the whole output (TokenLabeling: a 1 x 1
    RoIAlign over the crop), each dense cell the softmax of its own mean; then `t * on + off` with
    off = smoothing / C, on = 1 - smoothing + off."""
    cells = sample_grid(dense_scores(scores, indices, num_classes), theta, grid_hw, samples)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    cls = torch.softmax(cells.mean(dim=(2, 3)), dim=1) * on + off
    dense = torch.softmax(cells.flatten(2).transpose(1, 2), dim=2) * on + off
    return cls, dense
