"""DeepSpeed ZeRO-0/1/2/3 behind the engine seam: config, initialize, partitions, checkpoints, universal.

The only module of `pipeline` that imports `deepspeed` (tests/test_engines.py enforces it).

Precision (decided on evidence, see README "Mixed precision and BatchNorm"): `train.precision=bf16`
uses DeepSpeed's `torch_autocast` (fp32 weights, BatchNorm statistics and optimizer state; bf16
matmuls/convs), not DeepSpeed's `bf16` mode. Measured here: `bf16` mode does not run our RMT at all
(DeepSpeed 0.19.8, ZeRO-2: "expected scalar type BFloat16 but found Float"), and it would keep
BatchNorm's running statistics in bf16: a BatchNorm2d updated 500 times in bf16 ends 2.8% (var) and
3.5% (mean) away from the fp32 one, since updates of momentum x value fall below bf16's 8-bit
mantissa. Under `torch_autocast` + ZeRO-2, two identical 2-process CPU runs are bit-identical, which
exact resume relies on (tests/test_train.py). `fp16` (GPUs without bf16) uses DeepSpeed's fp16 mode
with dynamic loss scaling.

Under ZeRO-3 a parameter's local part is its flat partition `param.ds_tensor` (padded; `ds_numel`
and `ds_shape` give the full size), so the EMA costs 1/world of the model and no communication.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import shutil
from argparse import Namespace
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import logger
from torch import nn

from pipeline.models.checkpoints import CheckpointError
from pipeline.train.build import build_optimizer, plan_for
from pipeline.train.config import Config
from pipeline.train.engines import Unsharded

UNIVERSAL_INFO = {"universal_checkpoint_version": 0.4}


def config(cfg: Config, world_size: int, device_type: str, load_universal: bool = False) -> dict:
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


def init_distributed(rank: int, world_size: int, device: torch.device, timeout_s: float) -> None:
    """torch.distributed through DeepSpeed (nccl on CUDA, gloo on CPU); DeepSpeed's INFO logs off."""
    logger.setLevel(logging.WARNING)
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s), rank=rank,
                               world_size=world_size)


class Engine(Unsharded):
    """`deepspeed.initialize`'s engine behind the seam of `pipeline.train.engines.Engine`."""

    def __init__(self, ds_engine, optimizer: torch.optim.Optimizer | None):
        self.ds = ds_engine
        self.module: nn.Module = ds_engine.module
        self.optimizer = optimizer
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.module.parameters())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.ds(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> bool:
        before = self.ds.global_steps
        self.ds.step()
        return self.ds.global_steps != before

    def grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.ds.optimizer.param_groups[0]["lr"]

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def local_shard(self, param: nn.Parameter) -> torch.Tensor:
        return param.ds_tensor if self.partitioned else param.data

    def full_from_shards(self, shard: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        if not self.partitioned:
            return shard
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, shard)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)

    def shard_of_full(self, full: torch.Tensor, shard: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        if not self.partitioned:
            return full.view_as(shard)
        out = torch.zeros_like(shard)
        chunk = full.flatten()[dist.get_rank() * shard.numel():][: shard.numel()]
        out[: chunk.numel()].copy_(chunk)
        return out

    @contextlib.contextmanager
    def swapping_weights(self):
        """ZeRO-3 caches gathered parameters: drop the cache around writes to the partitions."""
        if not self.partitioned:
            yield
            return
        self.ds.empty_partition_cache()
        try:
            yield
        finally:
            self.ds.empty_partition_cache()

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        state = {**client_state, "universal_checkpoint_info": UNIVERSAL_INFO}
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)

    def load(self, ckpt_dir: Path, tag: str) -> dict:
        path, client_state = self.ds.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint '{ckpt_dir / tag}'")
        return client_state


def build(cfg: Config, model: nn.Module, world_size: int, device: torch.device,
          load_universal: bool = False) -> Engine:
    """deepspeed.initialize on our model and AdamW (SyncBatchNorm on multi-GPU when configured)."""
    if device.type == "cuda" and cfg.train.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                              config=config(cfg, world_size, device.type, load_universal),
                                              dist_init_required=False)
    return Engine(ds_engine, optimizer)


def checkpoint_layout(cfg: Config) -> dict:
    """What the checkpoint files depend on besides the world size, recorded in meta.json (`resume_source`
    reads it back; the field name stays, so the meta.json of every earlier run still resumes)."""
    return {"zero_stage": cfg.deepspeed.zero_stage}


def needs_conversion(meta: dict, cfg: Config, world_size: int) -> bool:
    """A checkpoint made at another world size or ZeRO stage loads through the universal format."""
    return meta["world_size"] != world_size or meta["zero_stage"] != cfg.deepspeed.zero_stage


def resume_source(ckpt_dir: Path, tag: str, meta: dict, cfg: Config, world_size: int) -> str:
    """Collective: the tag to load `tag` from at this world size and ZeRO stage (itself, or its universal
    twin, made here by rank 0)."""
    if not needs_conversion(meta, cfg, world_size):
        return tag
    if dist.get_rank() == 0:
        print(f"resuming {tag} (world size {meta['world_size']}, ZeRO-{meta['zero_stage']}) at world "
              f"size {world_size}, ZeRO-{cfg.deepspeed.zero_stage}: converting to a universal "
              "checkpoint", flush=True)
        convert_to_universal(ckpt_dir, tag)
    dist.barrier()
    return f"{tag}_universal"


def convert_to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert `tag` to DeepSpeed's universal format (rank 0 only); returns the universal tag.

    Same as: python -m deepspeed.checkpoint.ds_to_universal --input_folder CKPT/TAG
             --output_folder CKPT/TAG_universal
    """
    from deepspeed.checkpoint import ds_to_universal

    out = ckpt_dir / f"{tag}_universal"
    if (out / "DONE").is_file():
        return out.name
    shutil.rmtree(out, ignore_errors=True)
    args = Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(out), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal.main(args)
    (out / "DONE").write_text("ok\n")
    return out.name


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights (parameters and buffers) gathered from a checkpoint's ZeRO partitions, on CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
