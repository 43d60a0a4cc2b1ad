"""DeepSpeed engine: model construction, batch plan, DeepSpeed config generated from ours, optimizer.

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


def deepspeed_config(cfg: Config, world_size: int, device_type: str, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config, derived from ours (printed by `train --print-deepspeed-config`)."""
    plan = plan_for(cfg, world_size)
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
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch,
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


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the official decay groups (param_groups.py); the loop sets each group's LR per update."""
    groups = official_param_groups(model, cfg.optim.weight_decay)
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def initialize(cfg: Config, model: nn.Module, world_size: int, device: torch.device,
               load_universal: bool = False):
    """deepspeed.initialize on our model and optimizer; returns (engine, client optimizer)."""
    import deepspeed

    if device.type == "cuda" and cfg.train.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model)
    ds_config = deepspeed_config(cfg, world_size, device.type, load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine, optimizer
