"""Reading RMT weights from the files people actually have: official releases, our exports, DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import InputError
from pipeline.models.rmt import checkpoint_filter_fn


class CheckpointError(InputError, ValueError):
    """A weights file or training checkpoint that is missing, unreadable, incomplete or incompatible."""


def load_rmt_checkpoint(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """State dict from an official RMT checkpoint (`{'model': ...}` / `{'model_ema': ...}`), a plain
    state dict (.pth) or a safetensors file, with `module.` prefixes removed. `use_ema` picks the EMA
    weights of a file that has them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        if use_ema:
            raise CheckpointError(f"{path} is a safetensors file with one set of weights: drop --ema "
                                  f"(export the EMA with `python -m pipeline export ... --ema`)")
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # a bad header, a truncated file
            raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({type(e).__name__}: "
                                  f"{_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, ...
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch weights file, or damaged "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    if use_ema:
        ema = obj.get("model_ema") or obj.get("state_dict_ema")
        if not isinstance(ema, dict):
            raise CheckpointError(f"checkpoint {path} has no EMA weights (keys: {sorted(obj)[:8]})")
        obj = ema
    return checkpoint_filter_fn(obj, model=None)


def _first_line(e: Exception) -> str:
    """The gist of a library error (torch.load's explain several paragraphs about weights_only)."""
    text = str(e).strip().splitlines()
    return text[0][:120] if text else ""
