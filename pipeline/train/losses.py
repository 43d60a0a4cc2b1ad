"""Training losses, one per `train.loss` value: `build_loss(cfg)` returns `loss(output, batch) -> mean`.

`output` is what the model returns (a logits tensor, or a structured output such as a token-labeling
model's); `batch` is the loader's batch as it reached the step: `(images, targets, *extra targets)`.
Adding a loss (e.g. token labeling) is one module or class plus one entry in `LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.train.config import Config, ConfigError

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


LOSSES: dict[str, Callable[[Config], Loss]] = {
    "cross_entropy": lambda cfg: CrossEntropy(cfg.data.smoothing),
}


def build_loss(cfg: Config) -> Loss:
    if cfg.train.loss not in LOSSES:
        raise ConfigError(f"config key 'train.loss': {cfg.train.loss!r} is not one of {list(LOSSES)}")
    return LOSSES[cfg.train.loss](cfg)
