"""The `train` command: config -> distributed setup -> resume point -> loaders, model, engine -> restore
-> loop.

    python -m pipeline train --config configs/rmt_l.yaml [dotted.key=value ...] [--print-deepspeed-config]

Exit codes (the run contract): 0 finished; 75 stopped on SIGUSR1/SIGTERM after saving (run the same
command again to resume); 2 bad config or input; anything else a real failure. Running the same
command with the same output_dir resumes from checkpoints/latest; at a different world size the
checkpoint is first converted to DeepSpeed's universal format (by rank 0, automatically).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.train.run_dir import RUN_RECORDS, RunDir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/rmt_l.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=10")
    parser.add_argument("--print-deepspeed-config", action="store_true",
                        help="print the generated DeepSpeed config (for this world size) and exit")


def run(args: argparse.Namespace) -> int:
    from pipeline.train import distributed, engines
    from pipeline.train.build import plan_for
    from pipeline.train.config import load_config
    from pipeline.train.loop import StopFlag
    from pipeline.train.losses import build_loss

    # Before anything slow (DeepSpeed's import takes a second or more): until this, SIGTERM or Ctrl-C kills
    # the process, and a SIGINT its parent ignores (a background job's) is lost.
    stop = StopFlag()
    stop.install()
    try:
        cfg = load_config(args.config, args.overrides)
        backend = engines.backend(cfg)
        env = distributed.detect()
        device = distributed.choose_device(cfg.train.device, env.local_rank)
        if args.print_deepspeed_config:
            print(json.dumps(backend.config(cfg, env.world_size, device.type), indent=2))
            return 0
        if stop.requested and env.rank == 0:
            print("a stop was requested before the trainer could take signals: stopping after the first "
                  "step (or at once if there is nothing to train)", flush=True)
        loss = build_loss(cfg)  # an unknown train.loss is bad input: named before anything is written
        # The trainer's watchdog ends a phase stuck past collective_timeout_s with a message naming the
        # step; the backend's own timeout is only a backstop (gloo may abort the process without a word).
        plan = plan_for(cfg, env.world_size)  # before any process group: an indivisible batch is bad input
        with distributed.process_group(env, device, 2 * cfg.train.collective_timeout_s):
            return _train(cfg, backend, env, device, stop, loss, plan)
    finally:
        stop.release()


def _train(cfg, backend, env, device, stop, loss, plan) -> int:
    """Everything after the process group started: the run lock, resume, loaders, engine, the loop."""
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.build import build_model, plan_line
    from pipeline.train.config import ConfigError
    from pipeline.train.loop import Trainer

    output_dir = Path(cfg.output_dir)
    ckpt_dir = RunDir(output_dir).checkpoints
    lock = _take_run_dir(output_dir, env.rank)
    try:
        log = (lambda msg: print(msg, flush=True)) if env.rank == 0 else (lambda msg: None)
        log(plan_line(cfg, plan))
        if cfg.checkpoint.resume:
            # what to resume from is decided before the engine starts: a universal load is a config switch
            resume = ckpt.prepare_resume(ckpt_dir, cfg, env.world_size, log)
        else:
            _start_over(cfg, output_dir, env.rank)
            resume = None
        run_id = _new_run_id()
        if resume is not None:
            run_id = resume.meta.get("run_id") or run_id
        if env.rank == 0:  # the start is accepted: only now does the run dir get this start's config
            _record_config(cfg, output_dir, resume.tag if resume else None)

        from pipeline.data.load.loader import build_train_loader, build_val_loader

        # the loader's batch is the plan's micro-batch (data.batch_size is not a config key)
        data_cfg = dataclasses.replace(cfg.data, batch_size=plan.micro_batch)
        train_loader = build_train_loader(data_cfg, env.rank, env.world_size, device,
                                          label_maps=getattr(loss, "uses_label_maps", False))
        val_loader = build_val_loader(data_cfg, env.rank, env.world_size, device)
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
        engine = backend.build(cfg, model, env.world_size, device,
                               load_universal=resume is not None and resume.converted)
        ema = None
        if cfg.ema.enabled:
            from pipeline.train.ema import ShardedEma, effective_decay

            decay = effective_decay(cfg.ema.decay, plan.global_batch, cfg.ema.base_batch,
                                    cfg.ema.scale_with_batch)
            ema = ShardedEma(engine.module, decay, engine)
        trainer = Trainer(cfg, plan, engine, loss, ema, train_loader, val_loader, device, output_dir,
                          flops, stop, run_id)
        if resume is not None:
            ckpt.restore(engine, ckpt_dir, resume, trainer)
            log(f"resumed from {ckpt_dir / resume.tag} at step {trainer.step}, "
                f"epoch {trainer.position().epoch}")

        from pipeline.train.metrics import MetricsWriter

        writer = MetricsWriter(output_dir, env.rank, cfg.metrics.tensorboard, cfg.metrics.progress,
                               trainer.total_steps, trainer.step)
        try:
            code = trainer.run(writer)
        finally:
            writer.close()
        dist.barrier()
    finally:
        if lock is not None:
            lock.release()
    return code


def _agree(error: str | None) -> None:
    """Collective: every rank raises rank 0's error (a CheckpointError) so no rank waits for the others."""
    from pipeline.train import distributed

    error = distributed.from_rank0(error)
    if error:
        from pipeline.train.checkpoint import CheckpointError

        raise CheckpointError(error)


def _take_run_dir(output_dir: Path, rank: int):
    """Collective: rank 0 makes output_dir and takes its run lock; returns the lock (rank 0) or None."""
    from pipeline.errors import PipelineError
    from pipeline.train.run_lock import RunLock, describe

    lock, error = None, None
    if rank == 0:
        try:
            if output_dir.exists() and not output_dir.is_dir():
                raise PipelineError(f"output_dir {output_dir} is a file, not a directory: set output_dir "
                                    "to a new or existing run directory")
            output_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(output_dir)
            lock.acquire()
            if lock.took_over:
                print(f"took over the run lock of {describe(lock.took_over)} ({lock.took_over['reason']})",
                      flush=True)
        except (PipelineError, OSError) as e:
            error = str(e) if isinstance(e, PipelineError) else f"cannot use output_dir {output_dir}: {e}"
    _agree(error)
    return lock


def _start_over(cfg, output_dir: Path, rank: int) -> None:
    """checkpoint.resume=false: refuse a run dir with checkpoints unless checkpoint.start_over says what
    to do with them (move: into output_dir/superseded/<time>/, with the metrics; delete)."""
    import shutil
    import time

    from pipeline.train import checkpoint as ckpt

    layout = RunDir(output_dir)
    ckpt_dir, error = layout.checkpoints, None
    if rank == 0 and ckpt.has_checkpoints(ckpt_dir):
        if cfg.checkpoint.start_over == "no":
            error = (f"checkpoint.resume=false but {ckpt_dir} has checkpoints of an earlier run: resume "
                     f"(drop checkpoint.resume=false), use a new output_dir, or set "
                     f"checkpoint.start_over=move (kept under {layout.superseded}) or =delete")
        elif cfg.checkpoint.start_over == "move":
            aside = layout.superseded / time.strftime("%Y%m%d-%H%M%S")
            aside.mkdir(parents=True)
            for name in (ckpt_dir.name, *RUN_RECORDS):
                if (output_dir / name).exists():
                    os.replace(output_dir / name, aside / name)
            print(f"started over: the earlier run is kept in {aside}", flush=True)
        else:
            shutil.rmtree(ckpt_dir)
            layout.metrics.unlink(missing_ok=True)
            print(f"started over: deleted the earlier run's checkpoints in {ckpt_dir}", flush=True)
    _agree(error)


def _new_run_id() -> str:
    """The same on every rank (rank 0's), recorded in every checkpoint of the run."""
    import uuid

    from pipeline.train import distributed

    return distributed.from_rank0(uuid.uuid4().hex[:12])


def _record_config(cfg, output_dir: Path, resumed_tag: str | None) -> None:
    """config.yaml is this start's config; config_history/ keeps every start's (eval/export of a
    checkpoint read the copy inside the checkpoint, so they always see the config its weights had)."""
    from pipeline.train.config import save_config

    save_config(cfg, RunDir(output_dir).config)
    history = RunDir(output_dir).config_history
    history.mkdir(exist_ok=True)
    n = len(list(history.glob("*.yaml")))
    save_config(cfg, history / f"{n:03d}-{resumed_tag or 'fresh'}.yaml")


def _forward_flops(model, img_size: int) -> float:
    from pipeline.models.info import forward_flops

    return forward_flops(model, (img_size, img_size))
