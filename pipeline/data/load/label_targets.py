"""Token-labeling targets of a train batch: each sample's label map seen through its own augmentation.

The loaders keep the maps compact (top-k scores and indices, `pipeline.data.label_maps`) and add, per
sample, the affine sampling matrices of its crop, flip and geometric RandAugment ops, computed from
the same drawn parameters the image gets (`pipeline.data.load.aug_params.TrainParams`, keyed by the
sample's seed, so this holds on either decode path, after resume and at any world size). The dense
[B, classes, grid] target is built from them on the training device by `label_maps.targets`, where
it costs a scatter and one `grid_sample` instead of a per-core RoIAlign over all classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from pipeline.data import label_maps
from pipeline.data.errors import DataError
from pipeline.data.load.aug_params import SKIP, TrainParams


class LabelTargets(NamedTuple):
    """A batch's maps and sampling matrices; `label_maps.targets(*t, grid, classes)` makes the targets."""

    scores: torch.Tensor  # (B, k, H, W) fp16 top-k scores
    indices: torch.Tensor  # (B, k, H, W) int64 their classes
    theta: torch.Tensor  # (B, 2, 3, 3) float64, `label_maps.sample_affine`


def batch_targets(params: TrainParams, op_names: tuple[str, ...], image_hw: list[tuple[int, int]],
                  maps: list[bytes], where: Callable[[int], str], out_hw: tuple[int, int]) -> LabelTargets:
    """`LabelTargets` of B samples: their drawn `params`, full-image sizes, encoded maps (shard members);
    `where(j)` names sample j in an error (built only then: per sample it costs as much as the rest)."""
    decoded = []
    for j, m in enumerate(maps):
        try:
            decoded.append(label_maps.decode(m))
        except DataError:
            label_maps.decode(m, where(j))  # raises the same error, naming the sample
    odd = next((j for j, (s, _) in enumerate(decoded) if s.shape != decoded[0][0].shape), None)
    if odd is not None:
        raise DataError(f"label maps of one batch have shapes {decoded[0][0].shape} ({where(0)}) and "
                        f"{decoded[odd][0].shape} ({where(odd)}): write every map with one teacher and size, "
                        "then rebuild the shards")
    theta = []
    ops, args, boxes, flips = (params.ops.tolist(), params.args.tolist(), params.boxes.tolist(),
                               params.flips.tolist())  # plain Python numbers: cheaper per element
    for j, (h, w) in enumerate(image_hw):
        drawn = [(op_names[i], float(a)) for i, a in zip(ops[j], args[j], strict=True) if i != SKIP]
        theta.append(label_maps.sample_affine_rows(tuple(int(v) for v in boxes[j]), bool(flips[j]), drawn,
                                                   (h, w), out_hw, decoded[j][0].shape[1:]))
    return LabelTargets(torch.from_numpy(np.stack([s for s, _ in decoded])),
                        torch.from_numpy(np.stack([i for _, i in decoded]).astype(np.int64)),
                        torch.tensor(theta, dtype=torch.float64))
