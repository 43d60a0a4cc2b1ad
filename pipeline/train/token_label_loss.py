"""The token-labeling loss (TokenLabeling's `TokenLabelCrossEntropy`, as the official RMT* training used it).

    loss = cls_weight * CE(logits, lam * t_cls + (1 - lam) * t_cls.flip(0))
         + dense_weight * mean over the B x N tokens of CE(aux_logits[b, n], t_dense[b, n])

with CE(x, t) = -sum_c t_c log_softmax(x)_c (soft targets), `lam = 1 - box area / N` from the
model's MixToken box, and the official weights cls 1.0 / dense 0.5 (qhfan/RMT
classification_token_label_release/main.py: `--dense-weight 0.5 --cls-weight 1.0`, the non-GT
`TokenLabelCrossEntropy`). Label smoothing (0.1) is part of the targets, as in TokenLabeling's
`mixup_target` (`pipeline.data.label_maps.targets`).

MixToken's box reaches the dense term through the model: `RMT.forward_train` swaps the aux logits
inside the box back (`swap_box`), so token n of sample b is compared with sample b's own dense target;
that is the same as comparing the mixed tokens with the box-swapped dense target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.rmt import TokenLabelOutput

DENSE_WEIGHT = 0.5
CLS_WEIGHT = 1.0


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(target * log_softmax(logits)), in fp32."""
    return torch.sum(-target.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def mix_token_lambda(box: tuple[int, int, int, int], num_tokens: int) -> float:
    """The class target's share of the sample itself: 1 - (box area) / (final-stage tokens)."""
    r0, c0, r1, c1 = box
    return 1.0 - max(r1 - r0, 0) * max(c1 - c0, 0) / num_tokens


class TokenLabelCrossEntropy(nn.Module):
    """`forward(output, cls_target, dense_target)`: a `TokenLabelOutput` (logits (B, C), aux_logits
    (B, N, C), box), the soft class target (B, C) and the soft dense target (B, N, C), N in the
    aux logits' raster order."""

    def __init__(self, dense_weight: float = DENSE_WEIGHT, cls_weight: float = CLS_WEIGHT):
        super().__init__()
        if dense_weight < 0 or cls_weight < 0 or dense_weight + cls_weight <= 0:
            raise ValueError(f"dense_weight={dense_weight}, cls_weight={cls_weight}: give weights >= 0, "
                             "not both 0")
        self.dense_weight, self.cls_weight = dense_weight, cls_weight

    def forward(self, output: TokenLabelOutput, cls_target: torch.Tensor,
                dense_target: torch.Tensor) -> torch.Tensor:
        logits, aux, box = output
        b, n, c = aux.shape
        if cls_target.shape != (b, c) or dense_target.shape != (b, n, c):
            raise ValueError(f"targets {tuple(cls_target.shape)} / {tuple(dense_target.shape)} do not fit "
                             f"the output: expected ({b}, {c}) / ({b}, {n}, {c})")
        lam = mix_token_lambda(box, n)
        if lam < 1:
            cls_target = lam * cls_target + (1 - lam) * cls_target.flip(0)
        loss_cls = soft_cross_entropy(logits, cls_target)
        loss_dense = soft_cross_entropy(aux.reshape(b * n, c), dense_target.reshape(b * n, c))
        return self.cls_weight * loss_cls + self.dense_weight * loss_dense
