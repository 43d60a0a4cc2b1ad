"""Where a run's weights come from: a run dir, a checkpoint dir or a weights file, checked against the model.

`resolve_source` says what an `eval --checkpoint` / `export` argument points to and which config goes
with it (the copy saved inside the checkpoint, so weights are always read with the config they were
trained with); `checked_weights` returns its fp32 state dict after loading it strictly into the
architecture that config names, so nothing is evaluated or written under the wrong model's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.train.checkpoint import CONFIG_FILE, EMA_FILE, CheckpointError, is_complete, read_latest
from pipeline.train.config import Config, load_config
from pipeline.train.run_dir import RunDir


@dataclass
class Source:
    """What a --checkpoint / export argument points to."""
    kind: str  # "checkpoint" (a tag dir of the engine's files) | "file"
    path: Path  # tag dir, or the weights file
    config_path: Path | None

    def config(self, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        if self.config_path is None:
            raise CheckpointError(f"'{self.path}' is a weights file: pass --config configs/<recipe>.yaml "
                                  "to say which model and data to use")
        return load_config(self.config_path, overrides)


def resolve_source(arg: str, config: str | None = None) -> Source:
    p = Path(arg)
    if p.is_file():
        return Source("file", p, Path(config) if config else None)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint '{p}' does not exist: pass a run dir, a checkpoints/step_* dir "
                              "or a weights file")
    if RunDir(p).is_run_dir():
        tag = read_latest(RunDir(p).checkpoints)
        if tag is None:
            raise CheckpointError(f"run '{p}' has no complete checkpoint ({RunDir(p).latest} missing)")
        tag_dir, run_dir = RunDir(p).checkpoints / tag, p
    else:
        if not is_complete(p):
            raise CheckpointError(f"checkpoint '{p}' is incomplete or not a checkpoint dir (no meta.json)")
        tag_dir, run_dir = p, p.parent.parent
    own = tag_dir / CONFIG_FILE
    cfg_path = Path(config) if config else (own if own.is_file() else RunDir(run_dir).config)
    if not cfg_path.is_file():
        raise CheckpointError(f"no config for '{p}': {cfg_path} is missing; pass --config")
    return Source("checkpoint", tag_dir, cfg_path)


def consolidated_weights(source: Source, ema: bool, cfg: Config) -> dict[str, torch.Tensor]:
    """fp32 state dict (parameters and buffers) of the model or its EMA."""
    if source.kind == "file":
        from pipeline.models import load_rmt_checkpoint

        return load_rmt_checkpoint(source.path, use_ema=ema)
    if ema:
        path = source.path / EMA_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint '{source.path}' has no EMA ({EMA_FILE}): drop --ema")
        return torch.load(path, map_location="cpu", weights_only=True)
    from pipeline.train.engines import backend

    return backend(cfg).consolidated_state_dict(source.path)


def build_checked(cfg: Config, state: dict[str, torch.Tensor], origin: Path) -> torch.nn.Module:
    """The config's model with `state` loaded strictly; a one-line CheckpointError when they do not fit."""
    import timm

    import pipeline.models  # noqa: F401  (registers the RMT models with timm)

    model = timm.create_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        example = (missing or unexpected or shapes)[0]
        raise CheckpointError(
            f"weights in {origin} do not fit {cfg.model.name} (num_classes={cfg.model.num_classes}): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of another shape "
            f"(e.g. '{example}'); pass the --config of the run that made them")
    model.load_state_dict(state)
    return model


def checked_weights(source: Source, ema: bool, cfg: Config) -> torch.nn.Module:
    """The model of `cfg` holding the weights of `source` (its EMA with `ema`), checked strictly."""
    return build_checked(cfg, consolidated_weights(source, ema, cfg), source.path)
