"""Evaluation: exact top-1/top-5/loss over every validation image, and the `eval` command.

`python -m pipeline eval --checkpoint RUN_DIR|CHECKPOINT_DIR|official.pth [--ema] [--config YAML] [k=v ...]`
Runs in one process or under torchrun (the validation set is split across ranks, each image counted
once, correct counts summed with all_reduce).
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.errors import PipelineError


@torch.no_grad()
def evaluate(model, loader, device: torch.device, autocast_dtype: torch.dtype | None = None) -> dict:
    """`model` is a module or a DeepSpeed engine (which applies its own autocast)."""
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    for images, labels in loader:
        with amp:
            logits = model(images.to(device, non_blocking=True))
        logits = logits.float()
        labels = labels.to(logits.device)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top5.eq(labels[:, None])
        sums += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=-1).sum().item(),
                              F.cross_entropy(logits, labels, reduction="sum").item(), labels.numel()],
                             dtype=torch.float64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    c1, c5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "count": int(sums[3].item())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run dir (uses checkpoints/latest), a checkpoint dir (checkpoints/step_...), "
                             "or an official RMT .pth file")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--config",
                        help="config YAML (default: the run's config.yaml; needed for a .pth file)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, e.g. data.root=...")


def run(args: argparse.Namespace) -> int:
    from pipeline.data.load.loader import build_val_loader
    from pipeline.train import distributed
    from pipeline.train.weights import checked_weights, resolve_source

    source = resolve_source(args.checkpoint, args.config)
    cfg = source.config(args.overrides)
    env = distributed.detect()
    device = distributed.choose_device(cfg.train.device, env.local_rank)
    group = (distributed.process_group(env, device, cfg.train.collective_timeout_s) if env.world_size > 1
             else nullcontext())
    with group:
        model = checked_weights(source, args.ema, cfg)
        model.to(device).eval()
        loader = build_val_loader(cfg.data, env.rank, env.world_size, device)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" and device.type == "cuda" else None
        res = evaluate(model, loader, device, dtype)
    if res["count"] != loader.num_samples:
        raise PipelineError(f"evaluated {res['count']} images but the validation set has "
                            f"{loader.num_samples}")
    if env.rank == 0:
        print(json.dumps({"checkpoint": str(Path(args.checkpoint)), "ema": args.ema, **res}))
    return 0
