"""Export: consolidated fp32 weights of a run or checkpoint as safetensors or the official .pth layout.

`python -m pipeline export RUN_DIR|CHECKPOINT_DIR --out model.safetensors [--ema] [--pth]`
The result loads with `timm.create_model(name, num_classes=...).load_state_dict(...)` after
`import pipeline.models`; `--pth` writes `{'model': state_dict}` (the official RMT file layout).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.train.checkpoint import EMA_FILE, CheckpointError, is_complete, read_latest
from pipeline.train.config import Config, load_config


@dataclass
class Source:
    """What a --checkpoint / export argument points to."""
    kind: str  # "deepspeed" | "file"
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
    if (p / "checkpoints").is_dir():  # a run dir
        tag = read_latest(p / "checkpoints")
        if tag is None:
            raise CheckpointError(f"run '{p}' has no complete checkpoint (checkpoints/latest missing)")
        tag_dir, run_dir = p / "checkpoints" / tag, p
    else:
        if not is_complete(p):
            raise CheckpointError(f"checkpoint '{p}' is incomplete or not a checkpoint dir (no meta.json)")
        tag_dir, run_dir = p, p.parent.parent
    cfg_path = Path(config) if config else run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"no config for '{p}': {cfg_path} is missing; pass --config")
    return Source("deepspeed", tag_dir, cfg_path)


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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
        state = get_fp32_state_dict_from_zero_checkpoint(str(source.path.parent), tag=source.path.name)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def save_weights(state: dict[str, torch.Tensor], out: Path, pth: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}  # no shared storage
    if pth:
        torch.save({"model": tensors}, out)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(out), metadata={"format": "pt"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a run dir (uses checkpoints/latest) or a checkpoints/step_* dir")
    parser.add_argument("--out", required=True, help="output file (.safetensors, or .pth with --pth)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--pth", action="store_true",
                        help="write the official {'model': state_dict} .pth layout")
    parser.add_argument("--config", help="config YAML (default: the run's config.yaml)")


def run(args: argparse.Namespace) -> int:
    from pipeline.train.config import ConfigError

    try:
        source = resolve_source(args.source, args.config)
        cfg = source.config()
        state = consolidated_weights(source, args.ema, cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_weights(state, Path(args.out), args.pth)
    print(json.dumps({"out": args.out, "model": cfg.model.name, "tensors": len(state),
                      "ema": args.ema, "source": str(source.path)}))
    return 0
