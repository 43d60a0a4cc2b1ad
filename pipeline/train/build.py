"""What the trainer is built from: the model (timm), the batch plan, the peak LR and the AdamW optimizer.

The engine that wraps them (data parallelism, sharding, precision) is in `pipeline/train/engines/`.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.train.config import Config, ConfigError
from pipeline.train.param_groups import official_param_groups
from pipeline.train.schedule import BatchPlan, batch_plan


def build_model(cfg: Config) -> nn.Module:
    import timm

    import pipeline.models  # noqa: F401  (registers rmt_* with timm)

    # model.drop_path null: the variant's own rate (0.1/0.15/0.4/0.5, rmt.py MODEL_ARGS)
    drop_path = {} if cfg.model.drop_path is None else {"drop_path_rate": cfg.model.drop_path}
    try:
        model = timm.create_model(cfg.model.name, num_classes=cfg.model.num_classes,
                                  drop_rate=cfg.model.drop_rate, **drop_path, **cfg.model.kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"config key 'model.name': unknown model {cfg.model.name!r} "
                              f"(use rmt_t, rmt_s, rmt_b or rmt_l)") from None
        raise
    except TypeError as e:
        raise ConfigError(f"config key 'model.kwargs': {e}") from None
    if cfg.model.init_from:
        from pipeline.models import load_rmt_checkpoint

        state = load_rmt_checkpoint(cfg.model.init_from)
        model.load_state_dict(state)
    flags = cfg.model.grad_checkpointing
    try:
        model.set_grad_checkpointing(flags)
    except ValueError as e:
        raise ConfigError(f"config key 'model.grad_checkpointing': {e}") from None
    return model


def plan_for(cfg: Config, world_size: int) -> BatchPlan:
    """The recipe's global batch split over `world_size` ranks (indivisible: a one-line InputError)."""
    return batch_plan(cfg.train.global_batch, cfg.train.max_batch_per_device, world_size)


def peak_lr(cfg: Config) -> float:
    """optim.lr scaled linearly from lr_base_batch to the global batch (the same at every world size)."""
    return cfg.optim.lr * cfg.train.global_batch / cfg.optim.lr_base_batch


def plan_line(cfg: Config, plan: BatchPlan) -> str:
    """The launch header's and the trainer's first line: how the global batch is made, and the peak LR."""
    return (f"global batch {plan.global_batch} = {plan.world_size} ranks x {plan.micro_batch} micro-batch x "
            f"{plan.grad_accum} accumulation; peak lr {peak_lr(cfg):.4g} "
            f"(optim.lr {cfg.optim.lr:g} x {plan.global_batch} / {cfg.optim.lr_base_batch}), "
            f"schedule {cfg.optim.schedule}")


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the official decay groups (param_groups.py); the loop sets each group's LR per update."""
    groups = official_param_groups(model, cfg.optim.weight_decay)
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)

