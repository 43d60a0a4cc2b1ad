"""The `schedule` command: a recipe's batch plan and LR per epoch as JSON lines, before any GPU time is spent.

    python -m pipeline schedule --config configs/rmt_l.yaml [dotted.key=value ...] [--world-size N]

One line per epoch: `epoch`, `lr` (the value the epoch trains at; in `step` mode the mean over its updates),
`global_batch`, `steps_per_epoch`, `micro_batch`, `grad_accum`. The number of training samples comes from
`data.root`'s manifest.json when it exists, else `--train-samples` (default: ImageNet-1K's 1281167).
`--plan` prints only the line the launch scripts log: global batch = world x micro x accumulation, peak LR.
"""

from __future__ import annotations

import argparse
import json

IMAGENET_TRAIN = 1_281_167


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/rmt_l.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=1e-3")
    parser.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) the run uses (default: 1)")
    parser.add_argument("--train-samples", type=int, default=None,
                        help=f"training samples when data.root has no manifest (default: {IMAGENET_TRAIN})")
    parser.add_argument("--plan", action="store_true", help="print only the batch plan and peak LR line")


def train_samples(root: str, fallback: int | None) -> int:
    """The train split's size from `root`/manifest.json, else `fallback` (or ImageNet-1K's)."""
    from pipeline.data import manifest

    if manifest.path(root).is_file():
        return int(manifest.read(root)["splits"]["train"]["num_samples"])
    return IMAGENET_TRAIN if fallback is None else fallback


def epochs(cfg, plan, num_samples: int) -> list[dict]:
    """One record per epoch of `cfg` at `plan` over `num_samples` training samples."""
    from pipeline.errors import InputError
    from pipeline.train.build import peak_lr
    from pipeline.train.schedule import epoch_mean_lr

    steps = num_samples // plan.global_batch
    if steps < 1:
        raise InputError(f"{num_samples} training samples are fewer than train.global_batch="
                         f"{plan.global_batch}: lower train.global_batch or pass --train-samples")
    o = cfg.optim
    kw = dict(steps_per_epoch=steps, peak=peak_lr(cfg), warmup_lr=o.warmup_lr, min_lr=o.min_lr,
              warmup_epochs=o.warmup_epochs, epochs=cfg.train.epochs)
    return [{"epoch": e, "lr": epoch_mean_lr(o.schedule, e, **kw), "global_batch": plan.global_batch,
             "steps_per_epoch": steps, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum}
            for e in range(cfg.train.epochs)]


def run(args: argparse.Namespace) -> int:
    from pipeline.train.build import plan_for, plan_line
    from pipeline.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    plan = plan_for(cfg, args.world_size)
    if args.plan:
        print(plan_line(cfg, plan))
        return 0
    for record in epochs(cfg, plan, train_samples(cfg.data.root, args.train_samples)):
        print(json.dumps(record))
    return 0
