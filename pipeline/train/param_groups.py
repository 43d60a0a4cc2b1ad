"""The official RMT weight-decay rule: which parameters AdamW leaves undecayed, and the two param groups.

Official training (qhfan/RMT `classfication_release/main.py`, timm 0.9.10 per its install.sh) calls
`timm.optim.create_optimizer(args, model)`, i.e.
`param_groups_weight_decay(model, 0.05, model.no_weight_decay())`:
a trainable tensor is not decayed when `ndim <= 1`, its name ends in `.bias`, or it is listed by the official
`VisRetNet.no_weight_decay()`, which returns only `absolute_pos_embed` (RMT has no such parameter). So the
layer scales `gamma_1`/`gamma_2` (shape (1, 1, 1, C), RMT-B/L) are decayed.
"""

from __future__ import annotations

from torch import nn

# the official VisRetNet.no_weight_decay() (timm's create_optimizer ignores no_weight_decay_keywords())
OFFICIAL_NO_WEIGHT_DECAY = frozenset({"absolute_pos_embed"})


def official_no_decay_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters the official rule keeps out of weight decay."""
    return {n for n, p in model.named_parameters()
            if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias") or n in OFFICIAL_NO_WEIGHT_DECAY)}


def official_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's two groups in timm's order (no decay first), split by `official_no_decay_names`."""
    skip = official_no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in skip], "weight_decay": 0.0},
            {"params": [p for n, p in named if n not in skip], "weight_decay": weight_decay}]
