"""Shared fixtures: `tiny_shards`, a real shards folder (WebDataset + FFCV) of a tiny fake ImageNet."""

from __future__ import annotations

from pathlib import Path

import pytest


def fake_shards(base: Path, *, train: int, val: int, min_side: int, max_side: int, seed: int,
                shard_bytes: int) -> str:
    """`make shards` (both formats) of a 4-class fake ImageNet with its quirks (CMYK, grayscale, PNG) under
    `base`: `train`/`val` images in all, sides in [min_side, max_side]. Returns the shards folder."""
    from pipeline.data.convert import fake
    from pipeline.data.convert.shards import write_shards

    fake.write(base / "src", layouts=("folders",), num_classes=4, train_per_class=train // 4,
               val_per_class=val // 4, min_side=min_side, max_side=max_side, seed=seed)
    write_shards(str(base / "src" / "folders"), base / "out", workers=1, shard_bytes=shard_bytes,
                 classes=4, progress=False, log=lambda *a, **k: None)
    return str(base / "out")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """OUT of `make shards` for 4 classes x 16 train / 4 val images, 40-64 px sides (both formats)."""
    from pipeline.data.convert import fake
    from pipeline.data.convert.shards import write_shards

    base = tmp_path_factory.mktemp("tiny_shards")
    fake.write(base / "src", layouts=("folders",), num_classes=4, train_per_class=16, val_per_class=4,
               min_side=40, max_side=64, large_fraction=0.0, quirks=False, seed=0)
    out = base / "out"
    write_shards(str(base / "src" / "folders"), out, formats=("wds", "ffcv"), workers=1, seed=0,
                 shard_bytes=40_000, classes=4, progress=False, log=lambda *a, **k: None)
    return out


class Trainer:
    """Starts `python -m pipeline train` as N CPU processes (gloo), one per rank as srun does."""

    # a tiny RMT (4 stages kept, few channels) so a 2-process step takes ~0.1 s on CPU
    MODEL = {"name": "rmt_t", "num_classes": 4, "drop_path": 0.1,
             "kwargs": {"embed_dims": [16, 32, 64, 64], "depths": [1, 1, 1, 1], "num_heads": [2, 2, 4, 4],
                        "projection": 64}}

    def __init__(self, root, shards):
        self.root = root
        self.shards = shards

    def config(self, name: str, **sections) -> tuple:
        """Write a config YAML for run `name`; `sections` update the defaults section by section."""
        import yaml

        cfg = {
            "output_dir": str(self.root / name), "seed": 0, "model": dict(self.MODEL),
            "data": {"root": str(self.shards), "img_size": 32, "eval_img_size": 32, "workers": 0},
            "train": {"epochs": 2, "global_batch": 8, "max_batch_per_device": 4, "precision": "bf16",
                      "device": "cpu"},
            # per-step cosine: the official per-epoch curve would spend these 2-3 epochs at warmup_lr
            "optim": {"lr": 2e-3, "lr_base_batch": 8, "warmup_epochs": 0.5, "schedule": "step"},
            "checkpoint": {"every_steps": 4, "keep": 2},
            "metrics": {"log_every": 1, "tensorboard": False, "progress": "lines"},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path, self.root / name

    def command(self, config, overrides=()) -> list[str]:
        import sys

        return [sys.executable, "-m", "pipeline", "train", "--config", str(config), *overrides]

    def start(self, config, nproc: int = 2, overrides=(), log=None) -> Ranks:
        """Start `nproc` ranks the way srun does: one process each, RANK/WORLD_SIZE in the env."""
        import os
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for rank in range(nproc):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            if nproc > 1:
                env.update({"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            procs.append(subprocess.Popen(self.command(config, overrides), env=env, text=True,
                                          stdout=log or subprocess.PIPE, stderr=log or subprocess.PIPE))
        return Ranks(procs)

    def run(self, config, nproc: int = 2, overrides=(), timeout: float = 300) -> Ranks:
        ranks = self.start(config, nproc, overrides)
        ranks.communicate(timeout)
        return ranks


class Ranks:
    """The processes of one run; `returncode` is rank 0's, and every rank must agree."""

    def __init__(self, procs):
        self.procs = procs
        self.stdout = self.stderr = ""

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def poll(self):
        codes = [p.poll() for p in self.procs]
        return None if None in codes else codes[0]

    def communicate(self, timeout: float) -> None:
        import subprocess

        outs = []
        try:
            for p in self.procs:
                outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.stdout = "".join(o or "" for o, _ in outs)
        self.stderr = "".join(e or "" for _, e in outs)

    def wait(self, timeout: float) -> int:
        codes = [p.wait(timeout=timeout) for p in self.procs]
        assert len(set(codes)) == 1, f"ranks exited differently: {codes}"
        return codes[0]

    @property
    def returncode(self) -> int:
        codes = [p.returncode for p in self.procs]
        assert len(set(codes)) == 1, f"ranks exited differently: {codes}\n{self.stderr[-3000:]}"
        return codes[0]

    def kill(self) -> None:
        import signal

        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()


@pytest.fixture(scope="session")
def trainer(tiny_shards, tmp_path_factory):
    return Trainer(tmp_path_factory.mktemp("runs"), tiny_shards)


def recipe_config(trainer, name: str, **data) -> tuple:
    """(config, run dir) of a 2-process ZeRO-2 run over `tiny_shards` with the full augmentation recipe:
    3 epochs x 8 steps, checkpoints every 4 steps, EMA decay 0.9 (loader workers 0 unless `data` says
    otherwise)."""
    return trainer.config(name, data=data, train={"epochs": 3}, ema={"decay": 0.9, "scale_with_batch": False},
                          metrics={"log_every": 1, "tensorboard": False, "progress": "lines"})


def finished_run(trainer, name: str, **data) -> tuple:
    """`recipe_config`'s run, finished. Returns (config, run dir)."""
    config, run = recipe_config(trainer, name, **data)
    ranks = trainer.run(config)
    assert ranks.returncode == 0, ranks.stderr[-5000:]
    return config, run


@pytest.fixture(scope="session")
def reference_run(trainer):
    """`finished_run` on the CPU decode path (the default on CPU)."""
    return finished_run(trainer, "reference")


@pytest.fixture(scope="session")
def device_reference_run(trainer):
    """`finished_run` with data.decode=device (the CPU as the device) and the sample trace on."""
    return finished_run(trainer, "reference_device", decode="device", trace=True)
