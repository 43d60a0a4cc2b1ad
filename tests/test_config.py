"""Training config: recipes, overrides, clear errors, fingerprint, DeepSpeed config, launcher env."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.train.build import peak_lr, plan_for
from pipeline.train.config import (
    ConfigError,
    config_from_dict,
    fingerprint,
    fingerprint_diff,
    fingerprint_parts,
    load_config,
)
from pipeline.train.distributed import DistributedSetupError, detect, first_host
from pipeline.train.engines.deepspeed_zero import config as deepspeed_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAPER = {"rmt_t": 0.1, "rmt_s": 0.15, "rmt_b": 0.4, "rmt_l": 0.5}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipes_carry_the_paper_hyperparameters(name):
    from pipeline.models.rmt import MODEL_ARGS

    cfg = load_config(CONFIGS / f"{name}.yaml")
    # drop_path unset: the variant's own rate applies (engine.build_model passes none)
    assert cfg.model.name == name and cfg.model.drop_path is None
    assert MODEL_ARGS[name]["drop_path_rate"] == PAPER[name]
    o = cfg.optim
    assert (o.lr, o.lr_base_batch, o.min_lr, o.warmup_lr) == (5e-4, 512, 1e-5, 1e-6)
    assert (cfg.optim.weight_decay, cfg.optim.warmup_epochs, cfg.train.epochs) == (0.05, 5.0, 300)
    assert cfg.ema.decay == 0.99996
    d = cfg.data
    assert (d.rand_augment, d.reprob, d.mixup, d.cutmix, d.smoothing, d.repeated_aug, d.crop_pct) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1, 3, 0.875)
    assert (cfg.train.global_batch, cfg.optim.schedule) == (2048, "epoch")
    assert peak_lr(cfg) == pytest.approx(2e-3)  # every train_lr of the official logs peaks there


@pytest.mark.parametrize("name", ["rmt_s_tl", "rmt_b_tl", "rmt_l_tl"])
def test_starred_recipes_load_with_the_token_labeling_changes(name):
    """As the plain recipe but Mixup/CutMix and repeats off, random train interpolation, eval crop_pct
    0.96, 310 epochs, the token-labeling loss (issue 13; the official logs run 310 epochs)."""
    cfg, plain = load_config(CONFIGS / f"{name}.yaml"), load_config(CONFIGS / f"{name[:-3]}.yaml")
    d = cfg.data
    assert (cfg.model.name, cfg.train.loss, cfg.train.epochs) == (name, "token_label", 310)
    assert (d.mixup, d.cutmix, d.repeated_aug, d.interpolation, d.crop_pct) == (0.0, 0.0, 1, "random", 0.96)
    assert (d.rand_augment, d.reprob, d.smoothing) == (plain.data.rand_augment, plain.data.reprob, 0.1)
    assert (cfg.optim, cfg.ema, cfg.train.global_batch) == (plain.optim, plain.ema, plain.train.global_batch)


def test_demo_config_loads():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.model.name == "rmt_t" and cfg.data.img_size <= 64 and cfg.train.device == "cpu"


def test_overrides_by_their_documented_names():
    cfg = load_config(CONFIGS / "rmt_l.yaml", [
        "output_dir=/tmp/x", "data.root=/data/shards", "data.format=ffcv", "train.epochs=10",
        "train.max_steps=50", "train.global_batch=1024", "checkpoint.every_steps=7", "checkpoint.keep=1",
        "deepspeed.zero_stage=3", "seed=5", "optim.lr=4e-3",
        "model.grad_checkpointing=[true,false,true,false]"])
    assert (cfg.output_dir, cfg.data.root, cfg.data.format) == ("/tmp/x", "/data/shards", "ffcv")
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.global_batch) == (10, 50, 1024)
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep) == (7, 1)
    assert (cfg.deepspeed.zero_stage, cfg.seed) == (3, 5)
    assert cfg.optim.lr == 4e-3 and cfg.model.grad_checkpointing == [True, False, True, False]


@pytest.mark.parametrize("overrides, message", [
    (["train.epoch=3"], "unknown config key 'train.epoch'"),
    (["nosuch.key=1"], "unknown config key 'nosuch'"),
    (["train.epochs=abc"], "config key 'train.epochs': expected int"),
    (["train.epochs=2.5"], "config key 'train.epochs': expected int"),
    (["train.sync_bn=1"], "config key 'train.sync_bn': expected bool"),
    (["deepspeed.zero_stage=4"], "config key 'deepspeed.zero_stage': 4 is not one of"),
    (["train.precision=bf17"], "config key 'train.precision'"),
    (["train.global_batch=0"], "config key 'train.global_batch' must be >= 1"),
    (["train.max_batch_per_device=0"], "config key 'train.max_batch_per_device' must be >= 1"),
    (["train.batch_size=32"], "config key 'train.batch_size' is gone: set train.global_batch"),
    (["train.grad_accum=2"], "config key 'train.grad_accum' is gone"),
    (["data.batch_size=32"], "config key 'data.batch_size' is gone"),
    (["optim.schedule=cosine"], "config key 'optim.schedule': 'cosine' is not one of"),
    (["data.format=tar"], "data.format='tar'"),
    (["data.img_size=100"], "config key 'data.img_size' must be a multiple of 32"),
    (["train"], "must look like section.key=value"),
    (["train.epochs.x=1"], "'epochs' is not a section"),
])
def test_bad_keys_and_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(CONFIGS / "rmt_t.yaml", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_cli_prints_one_line_and_exits_2(capsys):
    assert main(["train", "--config", str(CONFIGS / "rmt_t.yaml"), "train.epoch=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'train.epoch'") and "\n" not in err


def test_fingerprint_allows_harmless_changes_only():
    base = config_from_dict({})
    harmless = config_from_dict({}, ["metrics.log_every=3", "checkpoint.every_steps=9", "data.format=ffcv",
                                     "deepspeed.zero_stage=3", "train.max_batch_per_device=64",
                                     "output_dir=/x"])
    assert fingerprint(harmless) == fingerprint(base)
    changed = config_from_dict({}, ["model.name=rmt_l", "data.seed=3"])
    assert sorted(fingerprint_diff(fingerprint_parts(base), changed)) == ["data.seed", "model.name"]


def test_print_deepspeed_config(capsys):
    assert main(["train", "--config", str(CONFIGS / "rmt_b.yaml"), "deepspeed.zero_stage=3",
                 "optim.clip_grad=1.0", "train.global_batch=256", "--print-deepspeed-config"]) == 0
    ds = json.loads(capsys.readouterr().out)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds and "fp16" not in ds  # BatchNorm statistics stay fp32
    assert (ds["gradient_clipping"], ds["gradient_accumulation_steps"]) == (1.0, 2)
    assert ds["train_batch_size"] == 128 * 2  # one process: micro 128 x accum 2 x world 1
    assert ds["comms_logger"] == {"enabled": False}


def test_fp16_uses_dynamic_loss_scaling():
    cfg = config_from_dict({}, ["train.precision=fp16"])
    ds = deepspeed_config(cfg, 8, "cuda")
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and "torch_autocast" not in ds
    assert ds["train_batch_size"] == 2048 and ds["train_micro_batch_size_per_gpu"] == 128
    assert ds["zero_optimization"]["overlap_comm"]


def test_launcher_environments():
    tr = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                 "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.source) == \
        (3, 8, 1, "n1", 1234, "torchrun")
    sl = detect({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                 "SLURM_JOB_NODELIST": "gpu[007-008,12]", "SLURM_JOB_ID": "4242"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.source) == (9, 16, 1, "gpu007", "slurm")
    assert sl.master_port == 20000 + 4242
    assert detect({}).world_size == 1 and detect({}).source == "single"
    assert first_host("a1,b2") == "a1" and first_host("node[1-3]") == "node1"
    with pytest.raises(DistributedSetupError, match="RANK"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(("world", "plan"), [(64, (32, 1)), (32, (64, 1)), (8, (128, 2)), (1, (128, 16))])
def test_plan_keeps_the_recipes_global_batch(world, plan):
    cfg = load_config(CONFIGS / "rmt_t.yaml")
    p = plan_for(cfg, world)
    assert ((p.micro_batch, p.grad_accum), p.global_batch) == (plan, 2048)
    ds = deepspeed_config(cfg, world, "cuda")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == plan


@pytest.mark.parametrize(("world", "fits"), [(3, 2), (56, 32)])
def test_a_world_size_that_cannot_divide_the_global_batch_is_one_line(capsys, world, fits):
    """3 ranks, or 64 -> 56 after losing a node: an error naming both numbers, not a nearby batch (any
    other global batch is another recipe: LR, EMA decay and steps per epoch follow it)."""
    assert main(["schedule", "--config", str(CONFIGS / "rmt_l.yaml"), "--world-size", str(world)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"train.global_batch=2048 is not divisible by the world size {world}" in err
    assert f"is {fits}" in err and "\n" not in err


def _sbatch(script: Path) -> tuple[str, int]:
    """(config, world size) of a launch script, read from its own header."""
    text = script.read_text()
    config = re.search(r"^RMT_DEFAULT_CONFIG=(\S+)$", text, re.M).group(1)
    nodes, tasks = (int(re.search(rf"^#SBATCH --{key}=(\d+)$", text, re.M).group(1))
                    for key in ("nodes", "ntasks-per-node"))
    return config, nodes * tasks


@pytest.mark.parametrize("script", sorted((CONFIGS.parent / "launch").glob("rmt_*.sh")), ids=lambda p: p.name)
def test_launch_scripts_run_the_recipes_global_batch(script):
    config, world = _sbatch(script)
    cfg = load_config(CONFIGS.parent / config)
    plan = plan_for(cfg, world)
    assert plan.global_batch == cfg.train.global_batch == 2048
    assert plan.micro_batch <= cfg.train.max_batch_per_device
    assert "rmt_slurm_main" in script.read_text()  # whose header logs the plan (launch/common.sh)
    assert 'rmt_log_batch_plan "$WORLD_SIZE"' in (CONFIGS.parent / "launch" / "common.sh").read_text()


def test_schedule_command_prints_one_line_per_epoch(capsys):
    assert main(["schedule", "--config", str(CONFIGS / "rmt_t.yaml"), "--world-size", "8",
                 "data.root=/nonexistent", "train.epochs=20"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["epoch"] for r in lines] == list(range(20))
    assert {(r["global_batch"], r["steps_per_epoch"], r["micro_batch"], r["grad_accum"]) for r in lines} == \
        {(2048, 1281167 // 2048, 128, 2)}
    assert lines[0]["lr"] == lines[1]["lr"] == 1e-6  # the official one-epoch lag
    assert lines[6]["lr"] == pytest.approx(1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * 5 / 20)))
    assert main(["schedule", "--config", str(CONFIGS / "rmt_t.yaml"), "--plan", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("global batch 2048 = 8 ranks x 128 micro-batch x 2 accumulation; peak lr 0.002")
