"""DeepSpeed engine: model construction, DeepSpeed config generated from ours, optimizer, LR schedule.

Precision (decided on evidence, see README "Mixed precision and BatchNorm"): `train.precision=bf16`
uses DeepSpeed's `torch_autocast` (fp32 weights, BatchNorm statistics and optimizer state; bf16
matmuls/convs), not DeepSpeed's `bf16` mode. Measured here: `bf16` mode does not run our RMT at all
(DeepSpeed 0.19.8, ZeRO-2: "expected scalar type BFloat16 but found Float"), and it would keep
BatchNorm's running statistics in bf16: a BatchNorm2d updated 500 times in bf16 ends 2.8% (var) and
3.5% (mean) away from the fp32 one, since updates of momentum x value fall below bf16's 8-bit
mantissa. Under `torch_autocast` + ZeRO-2, two identical 2-process CPU runs are bit-identical, which
exact resume relies on (tests/test_train.py). `fp16` (GPUs without bf16) uses DeepSpeed's fp16 mode
with dynamic loss scaling.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.train.config import Config, ConfigError


def build_model(cfg: Config) -> nn.Module:
    import timm

    import pipeline.models  # noqa: F401  (registers rmt_* with timm)

    try:
        model = timm.create_model(cfg.model.name, num_classes=cfg.model.num_classes,
                                  drop_path_rate=cfg.model.drop_path, drop_rate=cfg.model.drop_rate,
                                  **cfg.model.kwargs)
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


def global_batch(cfg: Config, world_size: int) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum * world_size


def scaled_lr(cfg: Config, world_size: int) -> float:
    return cfg.optim.lr * global_batch(cfg, world_size) / cfg.optim.lr_base_batch


def deepspeed_config(cfg: Config, world_size: int, device_type: str, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config, derived from ours (printed by `train --print-deepspeed-config`)."""
    zero: dict = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage > 0:
        zero.update({
            # overlapping communication needs CUDA streams; on CPU it only adds threads
            "overlap_comm": cfg.deepspeed.overlap_comm and device_type == "cuda",
            "contiguous_gradients": cfg.deepspeed.contiguous_gradients,
            "reduce_bucket_size": cfg.deepspeed.reduce_bucket_size,
            "allgather_bucket_size": cfg.deepspeed.allgather_bucket_size,
        })
    if cfg.deepspeed.zero_stage == 3:
        # every parameter partitioned (no persistent full copies), so the sharded EMA can be swapped in
        # for evaluation by writing each rank's partition
        zero["stage3_param_persistence_threshold"] = 0
    ds: dict = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": global_batch(cfg, world_size),
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "comms_logger": {"enabled": False},
        "flops_profiler": {"enabled": False},
        "checkpoint": {"load_universal": load_universal, "tag_validation": "Ignore"},
    }
    if cfg.train.precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif cfg.train.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    _merge(ds, cfg.deepspeed.extra)
    return ds


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def build_optimizer(cfg: Config, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-d parameters (norms, biases) and the model's no_weight_decay()."""
    from timm.optim import param_groups_weight_decay

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, cfg.optim.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=scaled_lr(cfg, world_size), betas=tuple(cfg.optim.betas),
                             eps=cfg.optim.eps)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """timm's cosine schedule with warmup, stepped per optimizer update (t_in_epochs=False)."""
    from timm.scheduler import CosineLRScheduler

    total = max(1, cfg.train.epochs * steps_per_epoch)
    warmup = min(total - 1, math.ceil(cfg.optim.warmup_epochs * steps_per_epoch)) if total > 1 else 0
    return CosineLRScheduler(optimizer, t_initial=total, lr_min=cfg.optim.min_lr, warmup_t=warmup,
                             warmup_lr_init=cfg.optim.warmup_lr, t_in_epochs=False)


def initialize(cfg: Config, model: nn.Module, world_size: int, device: torch.device,
               load_universal: bool = False):
    """deepspeed.initialize on our model and optimizer; returns (engine, client optimizer)."""
    import deepspeed

    if device.type == "cuda" and cfg.train.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model, world_size)
    ds_config = deepspeed_config(cfg, world_size, device.type, load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine, optimizer
