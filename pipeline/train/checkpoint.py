"""Checkpoints: atomic verified save, and resume end to end (tag choice, compatibility, world-size
conversion, restoring every stateful object), retention.

Layout of `<output_dir>/checkpoints/`:

    step_00000120/                 the engine's files (DeepSpeed: module, ZeRO optimizer partitions,
                                   client state)
        trainer_rank00000.pt ...   per rank: loader state and RNG states
        ema.pt                     consolidated fp32 EMA (rank 0)
        config.yaml                the config these weights were trained with (eval/export read it)
        meta.json                  written last by rank 0, after every rank finished: the "complete" mark;
                                   lists every file above with its size and sha256, the run id, and
                                   the engine's layout (`checkpoint_layout`: DeepSpeed's zero_stage)
    step_00000120_universal/       DeepSpeed universal checkpoint, made when resuming at another world size
    step_00000124.damaged/         a checkpoint found damaged at resume, set aside (never deleted, never
                                   counted by `checkpoint.keep`)
    latest                         names the newest complete tag; replaced atomically (os.replace)

A crash mid-save leaves a directory without meta.json, which is never resumed from and is removed by
the next save; the previous checkpoint and `latest` are untouched until the new one is complete.
Resume takes the newest *verified* checkpoint (`choose_resume`), saying in one line which newer ones
were skipped and why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.models.checkpoints import CheckpointError
from pipeline.train import checkpoint_verify as verify
from pipeline.train import distributed
from pipeline.train.config import (
    Config,
    ConfigError,
    fingerprint,
    fingerprint_diff,
    fingerprint_parts,
    save_config,
)
from pipeline.train.engines import backend
from pipeline.train.run_dir import CONFIG_FILE, LATEST

TAG_RE = re.compile(r"^step_(\d{8})$")
META = verify.META
EMA_FILE = "ema.pt"


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
    meta, err = verify.read_meta(Path(tag_dir))
    if err:
        raise CheckpointError(f"checkpoint '{tag_dir}': {err}: use an older checkpoint")
    return meta


def step_dirs(ckpt_dir: Path) -> list[str]:
    """Every step_* directory, complete or not, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def has_checkpoints(ckpt_dir: Path) -> bool:
    """Anything a previous run left: a step dir (complete or not), a set-aside one, or `latest`."""
    return ckpt_dir.is_dir() and any(p.name == LATEST or p.name.startswith("step_")
                                     for p in ckpt_dir.iterdir())


def _shares(names: list[str]) -> list[str]:
    """This rank's share of `names` (each rank hashes or checks every world_size-th file)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return names[rank::world]


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def verified_problems(tag_dir: Path) -> list[str]:
    """Collective: what is wrong with `tag_dir` (empty when verified); the files are checked by all ranks."""
    meta, err = verify.read_meta(tag_dir)
    if err:
        return [err]
    names = sorted(meta.get("files") or {})
    found = verify.problems(tag_dir, _shares(names)) if names else []
    return sorted(p for part in _gather(found) for p in part)


def choose_resume(ckpt_dir: Path, log) -> str | None:
    """Collective: the newest verified checkpoint's tag, or None when no checkpoint was ever completed.

    Newer checkpoints that fail verification are set aside as `<tag>.damaged` (rank 0) and named in
    one line each through `log`. A run dir that has (or had) a complete checkpoint but none verified
    raises CheckpointError: it never silently starts over.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    skipped = []
    # rank 0's listing: a rank listing after rank 0 set a tag aside would check other tags than rank 0,
    # their collectives would not pair, and the resume would hang (seen after a SIGKILL mid-save)
    for tag in reversed(distributed.from_rank0(step_dirs(ckpt_dir) if rank == 0 else None)):
        found = verified_problems(ckpt_dir / tag)
        if not found:
            if skipped:
                log(f"resuming from the newest verified checkpoint {tag} instead")
            return tag
        complete = (ckpt_dir / tag / META).is_file()
        skipped.append(f"{tag}: {'; '.join(found)}")
        log(f"warning: checkpoint {ckpt_dir / tag} is {'damaged' if complete else 'incomplete'} "
            f"({'; '.join(found)}); set aside as {tag}.damaged")
        if rank == 0:
            shutil.rmtree(ckpt_dir / f"{tag}.damaged", ignore_errors=True)
            os.replace(ckpt_dir / tag, ckpt_dir / f"{tag}.damaged")
        _barrier()
    had_complete = (ckpt_dir / LATEST).is_file() or any(
        (p / META).is_file() for p in ckpt_dir.glob("step_*.damaged")) if ckpt_dir.is_dir() else False
    if had_complete:
        raise CheckpointError(
            f"{ckpt_dir} has checkpoints but none is complete and verified "
            f"({'; '.join(skipped) or 'latest names a checkpoint that is gone'}): nothing to resume from. "
            f"To start over anyway: checkpoint.resume=false checkpoint.start_over=move (or delete)")
    if skipped:
        log("no checkpoint was ever completed in this run dir (only an unfinished first save): "
            "starting from step 0")
    return None


def check_compatible(meta: dict, cfg: Config, tag_dir: Path) -> None:
    diffs = fingerprint_diff(meta["fingerprint_parts"], cfg)
    if diffs:
        raise ConfigError(
            f"checkpoint '{tag_dir}' was made with different {', '.join(diffs)}: resuming would mix "
            f"incompatible runs; restore those values or use a new output_dir")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _already_saved(tag_dir: Path, run_id: str) -> bool:
    """Collective: `tag_dir` is this run's own verified checkpoint (e.g. resumed right after a save)."""
    meta, err = verify.read_meta(tag_dir)
    return err is None and meta.get("run_id") == run_id and not verified_problems(tag_dir)


def save(engine, ckpt_dir: Path, step: int, cfg: Config, state: dict, run_id: str, meta_extra: dict) -> str:
    """Collective: every rank calls it with the trainer's `state_dict()` (client, rank, ema). Returns the
    tag; `latest` points to it when this returns.

    A directory of the same step that is not this run's verified checkpoint is never reused: an
    incomplete leftover of a crashed save is removed, anything else is set aside as `<tag>.replaced`.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists() and not is_complete(tag_dir):
            shutil.rmtree(tag_dir)  # leftover of a crashed save of this same step
    _barrier()
    if is_complete(tag_dir):
        if _already_saved(tag_dir, run_id):
            return tag
        if rank == 0:
            aside = ckpt_dir / f"{tag}.replaced"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(tag_dir, aside)
        _barrier()
    try:
        engine.save(ckpt_dir, tag, state["client"])
        _atomic_torch_save(state["rank"], rank_file(tag_dir, rank))
        if rank == 0:
            if state["ema"] is not None:
                _atomic_torch_save(state["ema"], tag_dir / EMA_FILE)
            save_config(cfg, tag_dir / CONFIG_FILE)
    except (OSError, RuntimeError) as e:
        raise _save_error(e, tag_dir) from e
    _barrier()  # every rank's files are on disk
    names = distributed.from_rank0(verify.checkpoint_files(tag_dir) if rank == 0 else None)
    shares = _gather(verify.file_records(tag_dir, _shares(names)))
    records = {k: v for part in shares for k, v in part.items()}
    if rank == 0:
        meta = {"tag": tag, "step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                **backend(cfg).checkpoint_layout(cfg), "fingerprint": fingerprint(cfg),
                "fingerprint_parts": fingerprint_parts(cfg), "time": time.time(), "run_id": run_id,
                "files": records, **meta_extra}
        _atomic_write_text(tag_dir / META, json.dumps(meta, indent=2, sort_keys=True))
        _atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        prune(ckpt_dir, cfg.checkpoint.keep)
    _barrier()
    return tag


def _save_error(e: Exception, tag_dir: Path) -> CheckpointError:
    """A failed write as one line: a full disk names the path, the free space and what a save needs."""
    text = str(e)
    if getattr(e, "errno", None) == 28 or "No space left" in text or "unexpected pos" in text:
        free = shutil.disk_usage(tag_dir.parent).free
        ckpt_dir = tag_dir.parent
        previous = [d for d in step_dirs(ckpt_dir) if d != tag_dir.name and is_complete(ckpt_dir / d)]
        files = (read_meta(ckpt_dir / previous[-1]).get("files") or {}) if previous else {}
        need = sum(r["size"] for r in files.values())
        need_text = f"; the last checkpoint took {need / 1e6:.0f} MB" if need else ""
        return CheckpointError(f"no space left on the device of {tag_dir} while saving ({free / 1e6:.0f} MB "
                               f"free{need_text}): free space there; the previous checkpoint and 'latest' "
                               f"are intact, so the same command resumes from it")
    gist = text.splitlines()[0] if text else type(e).__name__
    return CheckpointError(f"saving checkpoint {tag_dir} failed: {gist}")


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


@dataclass(frozen=True)
class Resume:
    """What a start resumes from: the chosen tag, its meta.json, and the tag the engine loads (the same,
    or its universal twin at another world size / ZeRO stage)."""
    tag: str
    meta: dict
    load_tag: str

    @property
    def converted(self) -> bool:
        return self.load_tag != self.tag


def prepare_resume(ckpt_dir: Path, cfg: Config, world_size: int, log) -> Resume | None:
    """Collective, before the engine is built: the newest verified checkpoint, checked against `cfg`
    and converted for this world size when needed; None for a fresh start."""
    tag = choose_resume(ckpt_dir, log)
    if tag is None:
        return None
    meta = read_meta(ckpt_dir / tag)
    check_compatible(meta, cfg, ckpt_dir / tag)
    return Resume(tag, meta, backend(cfg).resume_source(ckpt_dir, tag, meta, cfg, world_size))


def restore(engine, ckpt_dir: Path, resume: Resume, trainer) -> None:
    """Load the engine's state from `resume.load_tag`, then every other stateful object (trainer:
    loader position, RNG, step, bests; EMA) through `trainer.load_state_dict` from `resume.tag`'s files.
    At another world size each rank gets rank 0's trainer file (the loader state is global)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        client_state = engine.load(ckpt_dir, resume.load_tag)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot load checkpoint {ckpt_dir / resume.load_tag} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from e
    tag_dir = ckpt_dir / resume.tag
    own = rank_file(tag_dir, rank)
    rank_state = _read(own if own.is_file() else rank_file(tag_dir, 0), weights_only=False)
    ema_path = tag_dir / EMA_FILE
    ema_state = _read(ema_path, weights_only=True) if ema_path.is_file() else None
    trainer.load_state_dict({"client": client_state, "rank": rank_state, "ema": ema_state})


def _read(path: Path, weights_only: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # a file changed after verification, or a checkpoint made before it
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the checkpoint is damaged; move "
                              f"{path.parent} aside to resume from the previous one") from e
