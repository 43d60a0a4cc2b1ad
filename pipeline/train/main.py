"""The `train` command: config -> distributed setup -> loaders, model, DeepSpeed engine -> resume -> loop.

    python -m pipeline train --config configs/rmt_l.yaml [dotted.key=value ...] [--print-deepspeed-config]

Exit codes (the run contract): 0 finished; 75 stopped on SIGUSR1/SIGTERM after saving (run the same
command again to resume); 2 bad config or input; anything else a real failure. Running the same
command with the same output_dir resumes from checkpoints/latest; at a different world size the
checkpoint is first converted to DeepSpeed's universal format (by rank 0, automatically).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/rmt_l.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=10")
    parser.add_argument("--print-deepspeed-config", action="store_true",
                        help="print the generated DeepSpeed config (for this world size) and exit")


def run(args: argparse.Namespace) -> int:
    from pipeline.data.errors import DataError
    from pipeline.train.checkpoint import CheckpointError
    from pipeline.train.config import ConfigError
    from pipeline.train.distributed import DistributedSetupError
    from pipeline.train.loop import TrainingError

    try:
        return _run(args)
    except (ConfigError, DataError, CheckpointError, DistributedSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    from pipeline.train import checkpoint as ckpt
    from pipeline.train import distributed
    from pipeline.train.config import ConfigError, load_config, save_config
    from pipeline.train.engine import build_model, build_scheduler, deepspeed_config, global_batch, initialize
    from pipeline.train.loop import StopFlag, Trainer

    cfg = load_config(args.config, args.overrides)
    env = distributed.detect()
    device = distributed.choose_device(cfg.train.device, env.local_rank)
    if args.print_deepspeed_config:
        print(json.dumps(deepspeed_config(cfg, env.world_size, device.type), indent=2))
        return 0
    stop = StopFlag()
    stop.install()  # before anything slow, so an early signal is not lost
    _quiet_deepspeed()
    # The trainer's watchdog ends a phase stuck past collective_timeout_s with a message naming the
    # step; the backend's own timeout is only a backstop (gloo may abort the process without a word).
    distributed.init(env, device, 2 * cfg.train.collective_timeout_s)

    output_dir = Path(cfg.output_dir)
    ckpt_dir = output_dir / "checkpoints"
    if env.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")

    # what to resume from (decided before DeepSpeed starts: a universal load is a config switch)
    tag = ckpt.read_latest(ckpt_dir) if cfg.checkpoint.resume else None
    load_tag = tag
    if tag is not None:
        meta = ckpt.read_meta(ckpt_dir / tag)
        ckpt.check_compatible(meta, cfg, ckpt_dir / tag)
        if meta["world_size"] != env.world_size or meta["zero_stage"] != cfg.deepspeed.zero_stage:
            if env.rank == 0:
                print(f"resuming {tag} (world size {meta['world_size']}, ZeRO-{meta['zero_stage']}) at world "
                      f"size {env.world_size}, ZeRO-{cfg.deepspeed.zero_stage}: converting to a universal "
                      "checkpoint", flush=True)
                ckpt.convert_to_universal(ckpt_dir, tag)
            dist.barrier()
            load_tag = f"{tag}_universal"

    from pipeline.data.load.loader import build_train_loader, build_val_loader

    train_loader = build_train_loader(cfg.data, env.rank, env.world_size, device)
    val_loader = build_val_loader(cfg.data, env.rank, env.world_size, device)
    if train_loader.num_classes != cfg.model.num_classes:
        raise ConfigError(f"config key 'model.num_classes' is {cfg.model.num_classes} but the shards in "
                          f"{cfg.data.root} have {train_loader.num_classes} classes: set "
                          f"model.num_classes={train_loader.num_classes}")

    # python/numpy global RNGs seeded per rank (saved and restored with checkpoints); torch's is
    # reseeded before every step by the loop. Identical initial weights on every rank:
    random.seed(cfg.seed * 1000 + env.rank)
    np.random.seed((cfg.seed * 1000 + env.rank) % 2**32)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    flops = _forward_flops(model, cfg.data.img_size) if env.rank == 0 else 0.0
    engine, optimizer = initialize(cfg, model, env.world_size, device, load_universal=load_tag != tag)
    steps_per_epoch = len(train_loader) // cfg.train.grad_accum
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    ema = None
    if cfg.ema.enabled:
        from pipeline.train.ema import ShardedEma, effective_decay

        decay = effective_decay(cfg.ema.decay, global_batch(cfg, env.world_size), cfg.ema.base_batch,
                                cfg.ema.scale_with_batch)
        ema = ShardedEma(engine.module, decay)
    trainer = Trainer(cfg, engine, scheduler, ema, train_loader, val_loader, device, output_dir, flops, stop)
    if tag is not None:
        client_state, rank_state, ema_state = ckpt.load(engine, ckpt_dir, tag, load_tag)
        trainer.restore(client_state, rank_state, ema_state)
        if env.rank == 0:
            print(f"resumed from {ckpt_dir / tag} at step {trainer.pos.step}, epoch {trainer.pos.epoch}",
                  flush=True)

    from pipeline.train.metrics import MetricsWriter

    writer = MetricsWriter(output_dir, env.rank, cfg.metrics.tensorboard, cfg.metrics.progress,
                           trainer.total_steps, trainer.pos.step)
    try:
        code = trainer.run(writer)
    finally:
        writer.close()
    dist.barrier()
    dist.destroy_process_group()
    return code


def _forward_flops(model, img_size: int) -> float:
    from pipeline.models.info import forward_flops

    return forward_flops(model, (img_size, img_size))
