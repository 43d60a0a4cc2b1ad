"""Training losses, one per `train.loss` value: `build_loss(cfg)` returns `loss(output, batch) -> mean`.

`output` is what the model returns (a logits tensor, or a structured output such as a token-labeling
model's); `batch` is the loader's batch as it reached the step: `(images, targets, *extra targets)`.
Adding a loss is one module or class plus one entry in `LOSSES`. A loss that needs more than the
model and the class targets checks its inputs when built (`build_loss` runs before anything is written).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.data import label_maps, manifest
from pipeline.data.errors import DataError
from pipeline.train.config import Config, ConfigError
from pipeline.train.token_label_loss import TokenLabelCrossEntropy

Loss = Callable[[object, Sequence[torch.Tensor]], torch.Tensor]


class CrossEntropy:
    """Cross-entropy on class indices (with label smoothing) or on Mixup/CutMix soft targets (2-d,
    label smoothing already folded in by the loader); computed in fp32 whatever the autocast dtype."""

    def __init__(self, smoothing: float):
        self.smoothing = smoothing

    def __call__(self, output: torch.Tensor, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        logits, targets = output.float(), batch[1]
        if targets.ndim == 2:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)


def is_token_label_model(cfg: Config) -> bool:
    """Whether `model` builds a token-labeling RMT (an `rmt_*_tl` name, or `kwargs.token_label`)."""
    return bool(cfg.model.kwargs.get("token_label", cfg.model.name.endswith("_tl")))


class TokenLabel:
    """TokenLabeling's loss (`TokenLabelCrossEntropy`) on targets built on the device from the batch's
    third element, the loader's `LabelTargets` (each sample's label map and augmentation geometry).

    The token grid is the model's final-stage grid, read off the aux logits: N tokens over an H x W
    input of stride s = sqrt(H W / N)."""

    uses_label_maps = True  # the train loader adds the batch's LabelTargets

    def __init__(self, cfg: Config):
        if not is_token_label_model(cfg):
            raise ConfigError(f"config key 'train.loss': token_label needs a token-labeling model, but "
                              f"model.name={cfg.model.name!r} is not one: use rmt_s_tl, rmt_b_tl or rmt_l_tl "
                              f"(or model.kwargs.token_label=true)")
        try:
            split = manifest.read(cfg.data.root)["splits"].get("train", {})
        except DataError as e:
            raise ConfigError(str(e)) from None
        if "label_maps" not in split:
            raise ConfigError(f"config key 'train.loss': token_label needs label maps in the shards, but "
                              f"data.root={cfg.data.root!r} has none: rebuild them with "
                              f"make shards LABELS=<maps> (maps: python -m pipeline label-maps)")
        if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
            raise ConfigError(f"config keys 'data.mixup' / 'data.cutmix' are {cfg.data.mixup} / "
                              f"{cfg.data.cutmix}, but train.loss=token_label mixes with MixToken in the "
                              f"model (Mixup would move pixels away from their label maps): set both to 0")
        self.smoothing = cfg.data.smoothing
        self.loss = TokenLabelCrossEntropy()

    def __call__(self, output, batch: Sequence) -> torch.Tensor:
        scores, indices, theta = batch[2]
        aux = output.aux_logits
        h, w = batch[0].shape[-2:]
        stride = round(math.sqrt(h * w / aux.shape[1]))
        grid = (h // stride, w // stride)
        cls, dense = label_maps.targets(scores.to(aux.device), indices.to(aux.device), theta.to(aux.device),
                                        grid, aux.shape[-1], self.smoothing)
        return self.loss(output, cls, dense)


LOSSES: dict[str, Callable[[Config], Loss]] = {
    "cross_entropy": lambda cfg: CrossEntropy(cfg.data.smoothing),
    "token_label": TokenLabel,
}


def build_loss(cfg: Config) -> Loss:
    if cfg.train.loss not in LOSSES:
        raise ConfigError(f"config key 'train.loss': {cfg.train.loss!r} is not one of {list(LOSSES)}")
    if cfg.train.loss != "token_label" and is_token_label_model(cfg):
        raise ConfigError(f"config key 'train.loss': model {cfg.model.name!r} is a token-labeling model and "
                          f"trains with train.loss=token_label, not {cfg.train.loss!r}")
    return LOSSES[cfg.train.loss](cfg)
