"""One entry point for every command: `python -m pipeline <command> ...` (or `rmt <command> ...`).

Each command lives in its own module, which exposes `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their command runs, so `model-info` never pays for DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import PipelineError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("pipeline.train.main", "train RMT with DeepSpeed (resumes from output_dir/checkpoints/latest)"),
    "eval": ("pipeline.train.evaluate", "top-1/top-5/loss of a checkpoint, its EMA, or an official RMT file"),
    "export": ("pipeline.train.export", "consolidated fp32 weights as safetensors or the official .pth"),
    "model-info": ("pipeline.models.info", "parameters and FLOPs of an RMT model"),
    "fake-imagenet": ("pipeline.data.convert.fake",
                      "write a small learnable fake ImageNet in every real layout"),
    "shards": ("pipeline.data.convert.shards",
               "ImageNet -> WebDataset shards + FFCV .beton files + manifest.json"),
    "verify-shards": ("pipeline.data.convert.verify", "re-read shards: checksums, keys, labels, images"),
    "label-maps": ("pipeline.label_maps_cmd", "TokenLabeling label maps of the train images from a teacher"),
    "verify-checkpoint": ("pipeline.train.verify_checkpoint",
                          "check a run's checkpoints (sizes, sha256) without loading them"),
    "schedule": ("pipeline.train.show_schedule",
                 "a recipe's batch plan and LR per epoch (JSON lines) at a given world size"),
    "preflight": ("pipeline.train.preflight", "per-rank host, matmul speed, all_reduce speed, slow hosts"),
    "report": ("pipeline.report", "PNG plots and a markdown summary of a run dir's metrics.jsonl"),
    "run-dir": ("pipeline.train.run_dir", "print one path of a run dir's layout (the launchers ask it)"),
    "demo": ("pipeline.demo", "fake ImageNet -> shards -> train, interrupt, resume, eval, export, report"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: python -m pipeline <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m pipeline <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except PipelineError as e:  # expected failures: one line, the error's exit code
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
