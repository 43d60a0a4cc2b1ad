"""Export: consolidated fp32 weights of a run or checkpoint as safetensors or the official .pth layout.

`python -m pipeline export RUN_DIR|CHECKPOINT_DIR --out model.safetensors [--ema] [--pth]`
The result loads with `timm.create_model(name, num_classes=...).load_state_dict(...)` after
`import pipeline.models`; `--pth` writes `{'model': state_dict}` (the official RMT file layout).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.train.weights import build_checked, consolidated_weights, resolve_source


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
    source = resolve_source(args.source, args.config)
    cfg = source.config()
    state = consolidated_weights(source, args.ema, cfg)
    build_checked(cfg, state, source.path)  # refuses weights of another architecture before writing
    save_weights(state, Path(args.out), args.pth)
    print(json.dumps({"out": args.out, "model": cfg.model.name, "tensors": len(state),
                      "ema": args.ema, "source": str(source.path)}))
    return 0
