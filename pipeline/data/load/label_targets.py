"""Token-labeling targets of a train batch: each sample's label map seen through its own augmentation.

The loaders keep the maps compact (top-k scores and indices, `pipeline.data.label_maps`) and add, per
sample, the affine sampling matrices of its crop, flip and geometric RandAugment ops, computed from
the same drawn parameters the image gets (`pipeline.data.load.aug_params.TrainParams`, keyed by the
sample's seed, so this holds on either decode path, after resume and at any world size). The dense
[B, classes, grid] target is built from them on the training device by `label_maps.targets`, where
it costs a scatter and one `grid_sample` instead of a per-core RoIAlign over all classes.
"""

from __future__ import annotations

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
                  maps: list[bytes], keys: list[str], out_hw: tuple[int, int]) -> LabelTargets:
    """`LabelTargets` of B samples: their drawn `params`, full-image sizes, encoded maps (shard members)."""
    decoded = [label_maps.decode(m, k) for m, k in zip(maps, keys, strict=True)]
    shapes = {s.shape for s, _ in decoded}
    if len(shapes) > 1:
        raise DataError(f"label maps of one batch have shapes {sorted(shapes)} (e.g. {keys[0]}): write every "
                        "map with one teacher and size, then rebuild the shards")
    theta = []
    for j, (h, w) in enumerate(image_hw):
        ops = [(op_names[i], float(a)) for i, a in zip(params.ops[j], params.args[j], strict=True)
               if i != SKIP]
        box = tuple(int(v) for v in params.boxes[j])
        theta.append(label_maps.sample_affine(box, bool(params.flips[j]), ops, (h, w), out_hw,
                                              decoded[j][0].shape[1:]))
    return LabelTargets(torch.from_numpy(np.stack([s for s, _ in decoded])),
                        torch.from_numpy(np.stack([i for _, i in decoded]).astype(np.int64)),
                        torch.from_numpy(np.stack(theta)))
