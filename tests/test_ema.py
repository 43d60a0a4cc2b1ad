"""Sharded EMA against timm's ModelEmaV3 as the plain reference: one process, and 2 real processes under
DeepSpeed ZeRO-1/2/3 (this file is also the worker script: `python tests/test_ema.py STAGE...`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from timm.utils import ModelEmaV3

from pipeline.train.ema import ShardedEma, effective_decay

TINY = {"embed_dims": [16, 32, 64, 64], "depths": [1, 1, 1, 1], "num_heads": [2, 2, 4, 4], "projection": 64}


def tiny_model():
    import timm

    import pipeline.models  # noqa: F401

    torch.manual_seed(0)
    return timm.create_model("rmt_t", num_classes=4, drop_path_rate=0.1, **TINY)


def test_matches_timm_reference_on_one_process():
    model = tiny_model()
    ema, ref = ShardedEma(model, 0.9), ModelEmaV3(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(4):
        torch.manual_seed(i)
        model(torch.randn(2, 3, 32, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        ref.update(model)
    mine, theirs = ema.full_state_dict(), ref.module.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    assert not torch.equal(mine["head.weight"], model.state_dict()["head.weight"])  # it did lag


def test_decay_scales_with_global_batch():
    assert effective_decay(0.99996, 1024, 512, True) == pytest.approx(0.99996**2)
    assert effective_decay(0.99996, 1024, 512, False) == 0.99996


@pytest.mark.slow
@pytest.mark.distributed
def test_matches_reference_under_zero_1_2_3_on_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, "1", "2", "3"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    for stage in (1, 2, 3):
        assert f"stage {stage}: ok" in outs[0], outs[0][-4000:]


def _worker(stages: list[int]) -> None:
    """Train a tiny RMT under each ZeRO stage; compare the sharded EMA with ModelEmaV3 on full weights."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger

    from pipeline.train import distributed
    from pipeline.train.engines.deepspeed_zero import Engine as DeepSpeedEngine

    logger.setLevel("WARNING")
    env = distributed.detect()
    distributed.init(env, torch.device("cpu"), 120)
    rank = dist.get_rank()
    for stage in stages:
        model = tiny_model()
        reference = ModelEmaV3(model, decay=0.8)
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), 1e-2),
                                          config=ds, dist_init_required=False)
        wrapped = DeepSpeedEngine(engine, None)
        ema = ShardedEma(engine.module, 0.8, wrapped)
        params = list(engine.module.parameters())
        for step in range(3):
            torch.manual_seed(100 * step + rank)
            loss = engine(torch.randn(2, 3, 32, 32)).square().mean()
            engine.backward(loss)
            engine.step()
            ema.update()
            with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
                full = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
            plain = tiny_model()
            plain.load_state_dict(full)
            reference.update(plain)
        mine, theirs = ema.full_state_dict(), reference.module.state_dict()
        bad = [k for k in theirs if not torch.equal(mine[k], theirs[k])]
        assert not bad, f"stage {stage}: EMA differs from the reference in {bad[:5]}"
        # evaluating with the EMA swapped in == the reference EMA model; training weights come back
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        engine.eval()
        before = engine(x)
        with ema.swap():
            swapped = engine(x)
        after = engine(x)
        reference.module.eval()
        assert torch.allclose(swapped, reference.module(x), atol=1e-5), f"stage {stage}: swap"
        assert torch.equal(before, after), f"stage {stage}: weights not restored after swap"
        # a consolidated EMA loads back into the partitions
        again = ShardedEma(engine.module, 0.8, wrapped)
        again.load_full_state_dict(mine)
        assert all(torch.equal(a, b) for a, b in zip(again.shadow, ema.shadow, strict=True)), stage
        print(f"stage {stage}: ok", flush=True)


if __name__ == "__main__":
    _worker([int(s) for s in sys.argv[1:]])
