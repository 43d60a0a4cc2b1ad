"""Typed training configuration: dataclasses, YAML loading, dotted overrides, fingerprint.

`load_config(path, overrides)` reads a recipe YAML, applies `a.b.c=value` overrides (values parsed
as YAML), and checks every key and type against the dataclasses below; unknown keys and wrong
types raise `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.errors import DataError
from pipeline.data.load.config import DataConfig
from pipeline.errors import InputError
from pipeline.train.schedule import SCHEDULES


class ConfigError(InputError, ValueError):
    """A bad config file, key or value; the message names it and says how to fix it."""


@dataclass
class ModelConfig:
    name: str = "rmt_t"
    num_classes: int = 1000
    drop_path: float | None = None  # null: the variant's own rate (rmt.py MODEL_ARGS: 0.1/0.15/0.4/0.5)
    drop_rate: float = 0.0
    # activation checkpointing: one flag for every stage, or one flag per stage
    grad_checkpointing: bool | list[bool] = False
    # extra constructor arguments (e.g. smaller embed_dims/depths for tests)
    kwargs: dict = field(default_factory=dict)
    # optional initial weights: an official RMT checkpoint file (not a resume)
    init_from: str = ""


@dataclass
class OptimConfig:
    lr: float = 5e-4  # at `lr_base_batch`; scaled by global_batch / lr_base_batch
    lr_base_batch: int = 512
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 0.0  # 0 = no clipping
    # epoch: the official DeiT order (one LR per epoch, one epoch behind); step: cosine per optimizer update
    schedule: str = "epoch"


@dataclass
class TrainConfig:
    epochs: int = 300
    max_steps: int = 0  # 0 = no limit
    # images per optimizer update, all ranks together (the recipe); each rank's micro-batch and the
    # gradient accumulation are derived from it and the world size (schedule.batch_plan)
    global_batch: int = 2048
    max_batch_per_device: int = 128  # the largest micro-batch one device takes
    precision: str = "bf16"  # bf16 (torch autocast, fp32 weights) | fp16 (DeepSpeed loss scaling) | fp32
    device: str = "auto"  # auto | cpu | cuda
    sync_bn: bool = True  # only on CUDA (SyncBatchNorm needs an accelerator)
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss does
    loss: str = "cross_entropy"  # a name in pipeline/train/losses.py LOSSES
    collective_timeout_s: int = 1800
    eval_every_epochs: int = 1  # 0 = never


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.99996  # at `base_batch`; decay ** (global_batch / base_batch) per step
    base_batch: int = 512
    scale_with_batch: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0 = only at epoch ends and on signals
    keep: int = 3
    resume: bool = True  # resume from the newest verified checkpoint in output_dir/checkpoints
    # with resume=false in a run dir that has checkpoints: no (refuse) | move (to superseded/) | delete
    start_over: str = "no"


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    # merged last into the generated DeepSpeed config (expert escape hatch)
    extra: dict = field(default_factory=dict)


@dataclass
class MetricsConfig:
    log_every: int = 50
    tensorboard: bool = True
    progress: str = "auto"  # auto (bar on a terminal) | bar | lines
    peak_tflops: float = 989.0  # per device, dense bf16 (H100/H200 SXM); for MFU


@dataclass
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


_CHOICES = {
    "train.precision": ("bf16", "fp16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.nonfinite": ("stop", "skip"),
    "metrics.progress": ("auto", "bar", "lines"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "checkpoint.start_over": ("no", "move", "delete"),
    "optim.schedule": SCHEDULES,
}

# keys that were replaced: a config still using them gets the new name, not "unknown key"
_REPLACED = {
    "train.batch_size": "train.global_batch (all ranks, per update) and train.max_batch_per_device",
    "train.grad_accum": "train.global_batch and train.max_batch_per_device (accumulation is derived)",
    "data.batch_size": "train.global_batch and train.max_batch_per_device (the loader's batch is the "
                       "derived micro-batch)",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}': expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "4e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool or tp is int:
        if type(value) is not tp:
            raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key '{key}' (known in this section: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{key}.")
        else:
            value = _coerce(key, value, tp)
            if key in _CHOICES and value not in _CHOICES[key]:
                raise ConfigError(f"config key '{key}': {value!r} is not one of {list(_CHOICES[key])}")
            kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.epochs=10)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e.__class__.__name__})") from None
    return key.strip(), value


def config_from_dict(tree: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = json.loads(json.dumps(tree or {}))  # deep copy of plain data
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    for key, new in _REPLACED.items():
        section, name = key.split(".")
        if isinstance(tree.get(section), dict) and name in tree[section]:
            raise ConfigError(f"config key '{key}' is gone: set {new}")
    cfg = _build(Config, tree, "")
    _check_values(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found: pass an existing YAML, e.g. configs/rmt_t.yaml")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{p}' holds a {type(tree).__name__}, not a mapping of sections "
                              "(e.g. 'train:', 'optim:'): see configs/rmt_t.yaml")
    return config_from_dict(tree, overrides)


def _check_values(cfg: Config) -> None:
    positive = {
        "train.global_batch": cfg.train.global_batch,
        "train.max_batch_per_device": cfg.train.max_batch_per_device,
        "train.epochs": cfg.train.epochs, "checkpoint.keep": cfg.checkpoint.keep,
        "metrics.log_every": cfg.metrics.log_every,
        "train.collective_timeout_s": cfg.train.collective_timeout_s,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    for key, value in {"train.max_steps": cfg.train.max_steps,
                       "checkpoint.every_steps": cfg.checkpoint.every_steps}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0 (0 = off), got {value}")
    for key, value in {"optim.lr": cfg.optim.lr, "optim.lr_base_batch": cfg.optim.lr_base_batch,
                       "optim.eps": cfg.optim.eps}.items():
        if not value > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    for key, value in {"optim.min_lr": cfg.optim.min_lr, "optim.warmup_lr": cfg.optim.warmup_lr,
                       "optim.weight_decay": cfg.optim.weight_decay,
                       "optim.warmup_epochs": cfg.optim.warmup_epochs,
                       "optim.clip_grad": cfg.optim.clip_grad, "model.drop_path": cfg.model.drop_path or 0.0,
                       "model.drop_rate": cfg.model.drop_rate}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"config key 'ema.decay' must be in [0, 1), got {cfg.ema.decay}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' needs two values, got {cfg.optim.betas}")
    for key in ("img_size", "eval_img_size"):
        value = getattr(cfg.data, key)
        if value % 32:
            raise ConfigError(f"config key 'data.{key}' must be a multiple of 32 (RMT's total stride), "
                              f"got {value}")
    try:
        cfg.data.validate()
    except DataError as e:
        raise ConfigError(str(e)) from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """The config as the user can load it again: derived values (the loader's micro-batch) left out."""
    tree = to_dict(cfg)
    del tree["data"]["batch_size"]  # derived from train.global_batch at every start
    Path(path).write_text(yaml.safe_dump(tree, sort_keys=False))


# Parts that must not change across a resume: they change what the weights or the sample order mean.
# Everything else (logging, checkpoint interval, world size, data format, zero stage via universal
# checkpoints, ...) may change.
_FINGERPRINT_KEYS = {
    "seed": None,
    "model": ("name", "num_classes", "kwargs"),
    "data": ("seed", "img_size", "repeated_aug", "mixup", "cutmix", "smoothing"),
}


def fingerprint_parts(cfg: Config) -> dict:
    d = to_dict(cfg)
    parts = {}
    for section, keys in _FINGERPRINT_KEYS.items():
        if keys is None:
            parts[section] = d[section]
        else:
            parts[section] = {k: d[section].get(k) for k in keys}
    return parts


def fingerprint(cfg: Config) -> str:
    blob = json.dumps(fingerprint_parts(cfg), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint_diff(old_parts: dict, cfg: Config) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's fingerprint parts and `cfg`."""
    new_parts = fingerprint_parts(cfg)
    diffs = []
    for section, value in new_parts.items():
        old = old_parts.get(section)
        if isinstance(value, dict):
            old = old or {}
            diffs += [f"{section}.{k}" for k in value if old.get(k) != value[k]]
        elif old != value:
            diffs.append(section)
    return diffs
