"""The `model-info` command: parameter count and FLOPs of an RMT model at a given input size."""

from __future__ import annotations

import argparse

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import pipeline.models  # noqa: F401  (registers the RMT models with timm)

# Reported in the paper (fvcore's count, which is multiply-accumulates) at 224 px.
PAPER_GFLOPS = {"rmt_t": 2.5, "rmt_s": 4.5, "rmt_b": 9.7, "rmt_l": 18.2}


def forward_flops(model: torch.nn.Module, size: tuple[int, int], in_chans: int = 3) -> float:
    """FLOPs of one image's forward pass (2 per multiply-add), counted by PyTorch's FlopCounterMode.

    Counts matmuls, convolutions and attention; elementwise ops (norms, activations, softmax) are
    left out, as in fvcore. A training step costs about 3x this (forward + backward)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, *size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return float(counter.get_total_flops())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=sorted(PAPER_GFLOPS), help="model name")
    parser.add_argument("--size", type=int, nargs="+", default=[224], metavar="PX",
                        help="input side, or height and width (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000)


def run(args: argparse.Namespace) -> int:
    if len(args.size) > 2:
        raise SystemExit("error: --size takes one side or a height and a width")
    height, width = (args.size * 2)[:2]
    model = timm.create_model(args.model, num_classes=args.num_classes)
    params = sum(p.numel() for p in model.parameters())
    flops = forward_flops(model, (height, width))
    print(f"model       {args.model}")
    print(f"input       3x{height}x{width}")
    print(f"parameters  {params:,}")
    print(f"GFLOPs      {flops / 1e9:.2f}  (forward, 2 FLOPs per multiply-add)")
    print(f"GMACs       {flops / 2e9:.2f}  (the paper's unit; paper at 224: {PAPER_GFLOPS[args.model]})")
    return 0
