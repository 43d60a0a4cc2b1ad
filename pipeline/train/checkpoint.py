"""Checkpoints: atomic save, `latest`, retention, config fingerprint, universal (world-size) conversion.

Layout of `<output_dir>/checkpoints/`:

    step_00000120/                 DeepSpeed's files (module, ZeRO optimizer partitions, client state)
        trainer_rank00000.pt ...   per rank: loader state and RNG states
        ema.pt                     consolidated fp32 EMA (rank 0)
        meta.json                  written last by rank 0, after every rank finished: the "complete" mark
    step_00000120_universal/       DeepSpeed universal checkpoint, made when resuming at another world size
    latest                         names the newest complete tag; replaced atomically (os.replace)

A crash mid-save leaves a directory without meta.json, which is never resumed from and is removed by
the next save; the previous checkpoint and `latest` are untouched until the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.models.checkpoints import CheckpointError
from pipeline.train.config import Config, ConfigError, fingerprint, fingerprint_diff, fingerprint_parts

TAG_RE = re.compile(r"^step_(\d{8})$")
META = "meta.json"
LATEST = "latest"
EMA_FILE = "ema.pt"
UNIVERSAL_INFO = {"universal_checkpoint_version": 0.4}


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"trainer_rank{rank:05d}.pt"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / META).is_file()


def read_latest(ckpt_dir: str | Path) -> str | None:
    """The tag `latest` names, if that checkpoint is complete."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and is_complete(Path(ckpt_dir) / tag) else None


def read_meta(tag_dir: str | Path) -> dict:
    path = Path(tag_dir) / META
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{tag_dir}' is incomplete (no {META}): "
                              "use an older tag or restart")
    return json.loads(path.read_text())


def check_compatible(meta: dict, cfg: Config, tag_dir: Path) -> None:
    diffs = fingerprint_diff(meta["fingerprint_parts"], cfg)
    if diffs:
        raise ConfigError(
            f"checkpoint '{tag_dir}' was made with different {', '.join(diffs)}: resuming would mix "
            f"incompatible runs; restore those values or use a new output_dir")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, ckpt_dir: Path, step: int, cfg: Config, client_state: dict, rank_state: dict,
         ema_state: dict | None, meta_extra: dict) -> str:
    """Collective: every rank calls it. Returns the tag; `latest` points to it when this returns."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists() and not is_complete(tag_dir):
            shutil.rmtree(tag_dir)  # leftover of a crashed save of this same step
    _barrier()
    if is_complete(tag_dir):
        return tag  # this exact step was saved already (e.g. resumed right after a save)
    state = dict(client_state)
    state["universal_checkpoint_info"] = UNIVERSAL_INFO
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    _atomic_torch_save(rank_state, rank_file(tag_dir, rank))
    if rank == 0 and ema_state is not None:
        _atomic_torch_save(ema_state, tag_dir / EMA_FILE)
    _barrier()  # every rank's files are on disk
    if rank == 0:
        meta = {"tag": tag, "step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "zero_stage": cfg.deepspeed.zero_stage, "fingerprint": fingerprint(cfg),
                "fingerprint_parts": fingerprint_parts(cfg), "time": time.time(), **meta_extra}
        _atomic_write_text(tag_dir / META, json.dumps(meta, indent=2, sort_keys=True))
        _atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        prune(ckpt_dir, cfg.checkpoint.keep)
    _barrier()
    return tag


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and incomplete leftovers."""
    latest = read_latest(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    complete = [t for t in tags if is_complete(ckpt_dir / t)]
    kept = set(complete[-keep:]) | ({latest} if latest else set())
    newest_kept = max(kept) if kept else ""
    for t in tags:
        if t in kept or (t > newest_kept):  # a newer incomplete dir may be another save in flight
            continue
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)
        shutil.rmtree(ckpt_dir / f"{t}_universal", ignore_errors=True)


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


def load(engine, ckpt_dir: Path, tag: str, load_tag: str) -> tuple[dict, dict, dict | None]:
    """Load DeepSpeed state from `load_tag` (tag or its universal twin); our own files from `tag`.

    Returns (client_state, this rank's trainer state, consolidated EMA state or None). At another
    world size each rank gets rank 0's trainer state (the loader state is global).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint '{ckpt_dir / load_tag}'")
    tag_dir = ckpt_dir / tag
    own = rank_file(tag_dir, rank)
    rank_state = torch.load(own if own.is_file() else rank_file(tag_dir, 0), map_location="cpu",
                            weights_only=False)
    ema_path = tag_dir / EMA_FILE
    ema_state = torch.load(ema_path, map_location="cpu", weights_only=True) if ema_path.is_file() else None
    return client_state, rank_state, ema_state
