"""The `train` command end to end: 2 real processes on CPU under ZeRO-1/2/3 over tiny real shards;
exact resume after SIGKILL; checkpoint on signal; 2 -> 1 process universal resume; non-finite loss;
a dead rank; a hung collective."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import recipe_config

pytestmark = [pytest.mark.slow]

NO_AUG = {"rand_augment": "", "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0, "repeated_aug": 1}


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    # a line being written right now (no newline yet) is left for the next read
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and line.strip()]


def evals(run: Path) -> dict[int, dict]:
    """step -> its eval record without the wall-clock time (a re-run evaluation: the later line)."""
    return {m["step"]: {k: v for k, v in m.items() if k != "time"}
            for m in metrics(run) if m["kind"] == "eval"}


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def check(proc, code: int = 0) -> None:
    assert proc.returncode == code, \
        f"exit {proc.returncode}, wanted {code}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def tensors(obj, prefix=""):
    """Flatten nested dicts/lists of a checkpoint file into {path: tensor or plain value}."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


# DeepSpeed records these about the process that wrote the file, not about the training state
VOLATILE = ("/ds_config", "/ds_version", "/time")


def differences(dir_a: Path, dir_b: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Paths of tensors/values that differ between two checkpoint directories (every *.pt file)."""
    files_a = sorted(p.name for p in dir_a.glob("*.pt"))
    assert files_a == sorted(p.name for p in dir_b.glob("*.pt")), "different checkpoint files"
    diffs = []
    for name in files_a:
        a = tensors(torch.load(dir_a / name, map_location="cpu", weights_only=False))
        b = tensors(torch.load(dir_b / name, map_location="cpu", weights_only=False))
        assert a.keys() == b.keys(), f"{name}: different keys {set(a) ^ set(b)}"
        for key in a:
            if key.startswith(VOLATILE + ignore):
                continue
            va, vb = a[key], b[key]
            if isinstance(va, torch.Tensor):
                same = va.dtype == vb.dtype and va.shape == vb.shape and torch.equal(va, vb)
            elif hasattr(va, "__array__"):
                same = bool((va == vb).all())
            elif hasattr(va, "__dict__"):  # e.g. DeepSpeed's loss scaler object
                same = type(va) is type(vb) and vars(va) == vars(vb)
            else:
                same = va == vb
            if not same:
                diffs.append(f"{name}:{key}")
    return diffs


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_process_zero_stage_learns(trainer, stage):
    # ZeRO-1 also runs gradient accumulation: 2 micro-batches of 4 per step, the same global batch
    train = {"epochs": 3, "global_batch": 16, "max_batch_per_device": 4 if stage == 1 else 8}
    config, run = trainer.config(f"zero{stage}", data=NO_AUG, train=train,
                                 optim={"lr": 8e-3, "lr_base_batch": 16, "warmup_epochs": 0.5},
                                 checkpoint={"every_steps": 0, "keep": 1},
                                 metrics={"log_every": 4, "tensorboard": stage == 2, "progress": "lines"},
                                 deepspeed={"zero_stage": stage})
    check(trainer.run(config))
    lines = metrics(run)
    evals = [m for m in lines if m["kind"] == "eval"]
    assert [m["epoch"] for m in evals] == [1, 2, 3]
    assert evals[-1]["loss"] < 0.85 * evals[0]["loss"], evals
    assert evals[-1]["top1"] > 40.0
    train = [m for m in lines if m["kind"] == "train"]
    for key in ("loss", "lr", "grad_norm", "images_per_s", "images_per_s_per_device", "step_time_s",
                "data_wait_frac", "mfu", "max_mem_gb", "time"):
        assert key in train[0]
    assert train[0]["images_per_s"] == pytest.approx(2 * train[0]["images_per_s_per_device"])
    assert lines[-1] == {**lines[-1], "kind": "end", "reason": "finished", "step": 12}
    assert latest(run) == "step_00000012"
    assert (run / "config.yaml").is_file()
    if stage == 2:
        assert any((run / "tensorboard").iterdir())
        # the same command again: already finished, resumes and exits at once
        before = len(metrics(run))
        again = trainer.run(config)
        check(again)
        assert "resumed from" in again.stdout
        after = metrics(run)
        assert len(after) == before + 1
        assert after[-1] == {**after[-1], "kind": "end", "reason": "finished", "step": 12}


def kill_when(proc, log: Path, reached) -> None:
    """SIGKILL every rank of `proc` once `reached()` is true (the run must get there within 240 s)."""
    deadline = time.time() + 240
    while not reached():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"the run did not get there: {log.read_text()[-3000:]}"
        time.sleep(0.05)
    proc.kill()


@pytest.mark.distributed
@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_exact_resume_after_sigkill(trainer, request, tmp_path, decode):
    """Killed at a random step and started again (2 loader workers): bit-identical to the reference, on
    either decode path (data.decode=device: the CPU is the device)."""
    if decode == "cpu":
        _, ref_run = request.getfixturevalue("reference_run")
        name, data = "killed", {"workers": 2}
    else:
        _, ref_run = request.getfixturevalue("device_reference_run")
        name, data = "killed_device", {"workers": 2, "decode": "device", "trace": True}
    config, run = recipe_config(trainer, name, **data)
    kill_at = random.Random(os.getpid()).randint(6, 18)  # 24 steps; checkpoints every 4
    with open(tmp_path / "killed.log", "w") as log:
        kill_when(trainer.start(config, log=log), tmp_path / "killed.log",
                  lambda: any(m.get("step", 0) >= kill_at for m in metrics(run) if m["kind"] == "train"))
    killed_at = max(m["step"] for m in metrics(run) if m["kind"] == "train")
    assert killed_at < 24
    check(trainer.run(config))
    assert latest(run) == latest(ref_run) == "step_00000024"
    # torch's global RNG state is saved but differs here by design: with loader workers, torch's
    # DataLoader draws worker base seeds from it (the validation loader at every epoch end). Training
    # never depends on it: the loop reseeds torch from (seed, step, rank) before every step.
    diffs = differences(ref_run / "checkpoints" / latest(ref_run), run / "checkpoints" / latest(run),
                        ignore=("/rng/torch",))
    assert diffs == [], f"killed at step {killed_at}: {diffs[:10]}"
    # Evaluations too, exactly: they read BatchNorm's running statistics, which each rank updates from its
    # own batches and only rank 0's file keeps; the trainer averages them over the ranks before every
    # save and evaluation, else a resumed rank 1 evaluates with rank 0's (CI saw top-1 equal, loss 0.2% off).
    assert sorted(evals(run)) == [8, 16, 24] and evals(run) == evals(ref_run)
    ref_loss = {m["step"]: m["loss"] for m in metrics(ref_run) if m["kind"] == "train"}
    loss = {m["step"]: m["loss"] for m in metrics(run) if m["kind"] == "train"}  # later lines win
    assert loss == ref_loss


@pytest.mark.distributed
def test_signal_checkpoint_then_universal_resume_on_one_process(trainer, tmp_path):
    """SIGUSR1 to one rank: all ranks save and exit 75; the run continues on 1 process from a universal
    checkpoint, covering the rest of the epoch's samples exactly once."""
    config, run = trainer.config("signal", data=NO_AUG,
                                 train={"epochs": 2, "global_batch": 4, "max_batch_per_device": 2},
                                 checkpoint={"every_steps": 0, "keep": 5},
                                 metrics={"log_every": 1, "tensorboard": False, "progress": "lines"})
    with open(tmp_path / "signal.log", "w") as log:
        proc = trainer.start(config, log=log)
        deadline = time.time() + 240
        while not any(m.get("step", 0) >= 2 for m in metrics(run) if m["kind"] == "train"):
            assert proc.poll() is None, (tmp_path / "signal.log").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pids[1], signal.SIGUSR1)
        assert proc.wait(timeout=120) == 75, (tmp_path / "signal.log").read_text()[-3000:]
    end = metrics(run)[-1]
    assert end["kind"] == "end" and end["reason"] == "signal"
    stopped = end["step"]
    assert latest(run) == f"step_{stopped:08d}"
    meta = json.loads((run / "checkpoints" / latest(run) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["micro_in_epoch"] == stopped

    proc = trainer.run(config, nproc=1)
    check(proc)
    assert (run / "checkpoints" / f"step_{stopped:08d}_universal").is_dir()
    assert "converting to a universal checkpoint" in proc.stdout
    # 64 samples per epoch, 4 per step before and after the stop (1 process: 2 x 2 accumulated)
    assert "global batch 4 = 1 ranks x 2 micro-batch x 2 accumulation" in proc.stdout
    resumed_steps = (64 - 4 * stopped) // 4
    evals = [m for m in metrics(run) if m["kind"] == "eval"]
    assert evals[0]["step"] == stopped + resumed_steps and evals[0]["epoch"] == 1
    assert metrics(run)[-1]["step"] == stopped + resumed_steps + 16  # epoch 2 at one process
    first_after = next(m for m in metrics(run) if m["kind"] == "train" and m["step"] == stopped + 1
                       and m["images_per_s"] == m["images_per_s_per_device"])
    assert first_after["loss"] < 1.6  # continues from trained weights, not from a broken state


def trace_steps(run: Path, rank: int, last_step: int | None = None) -> dict[int, dict]:
    """{step: trace record} of one rank's data.trace file (later lines of a step win), up to `last_step`."""
    path = run / "trace" / f"rank_{rank:05d}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r for r in records if last_step is None or r["step"] <= last_step}


@pytest.mark.distributed
@pytest.mark.parametrize("first,then", [("cpu", "device"), ("device", "cpu")])
def test_a_resume_that_switches_the_decode_path_continues_at_the_same_sample(trainer, device_reference_run,
                                                                            tmp_path, first, then):
    """Killed after its first checkpoint on one decode path, resumed on the other (data.decode override):
    every step of both ranks trains the same samples as the uninterrupted run (data.trace)."""
    _, ref_run = device_reference_run
    config, run = recipe_config(trainer, f"switch_{first}", decode=first, trace=True)
    with open(tmp_path / "killed.log", "w") as log:
        kill_when(trainer.start(config, log=log), tmp_path / "killed.log",
                  lambda: (run / "checkpoints" / "latest").is_file())
    stopped = int(latest(run).split("_")[1])
    resumed = trainer.run(config, overrides=[f"data.decode={then}"])
    check(resumed)
    assert f"at step {stopped}," in resumed.stdout and latest(run) == "step_00000024"
    for rank in (0, 1):
        ref, got = trace_steps(ref_run, rank), trace_steps(run, rank)  # later lines (the resumed run) win
        assert sorted(got) == sorted(ref) == list(range(1, 25))
        assert all(got[s]["samples"] == ref[s]["samples"] for s in ref), (rank, stopped)


@pytest.mark.distributed
def test_two_to_one_process_resume_keeps_the_recipe(trainer, tmp_path):
    """Killed mid-epoch at 2 processes, resumed at 1: the global batch stays 4 (accumulation 2 -> 4 by
    itself), every step trains the same samples at the same LR as the uninterrupted 2-process run, and
    the weights agree up to fp32 reduction order (fp32 training). Micro-batch 1, so every forward pass
    sees the same single image at both world sizes (BatchNorm's batch statistics then match); no DropPath
    (seeded per rank)."""
    # 64 px: the last stage keeps 2 x 2 positions for BatchNorm at batch 1
    sections = dict(data={**NO_AUG, "trace": True, "img_size": 64, "eval_img_size": 64},
                    model={**trainer.MODEL, "drop_path": 0.0},
                    # fp32: under bf16 autocast DeepSpeed all-reduces Linear/Conv gradients in bf16
                    # (torch_autocast.init_autocast_params), which 1 process never does
                    train={"epochs": 2, "global_batch": 4, "max_batch_per_device": 1, "precision": "fp32"},
                    optim={"lr": 2e-3, "lr_base_batch": 4, "warmup_epochs": 0.5, "schedule": "step"},
                    checkpoint={"every_steps": 3, "keep": 3}, ema={"decay": 0.9, "scale_with_batch": False})
    ref_config, ref_run = trainer.config("plan_reference", **sections)
    ref = trainer.run(ref_config)
    check(ref)
    assert "global batch 4 = 2 ranks x 1 micro-batch x 2 accumulation" in ref.stdout

    config, run = trainer.config("plan_resumed", **sections)
    with open(tmp_path / "killed.log", "w") as log:
        kill_when(trainer.start(config, log=log), tmp_path / "killed.log",
                  lambda: (run / "checkpoints" / "latest").is_file())
    meta = json.loads((run / "checkpoints" / latest(run) / "meta.json").read_text())
    assert meta["world_size"] == 2 and 0 < meta["micro_in_epoch"], meta  # mid-epoch (16 steps per epoch)
    stopped = int(latest(run).split("_")[1])

    resumed = trainer.run(config, nproc=1)
    check(resumed)
    assert "global batch 4 = 1 ranks x 1 micro-batch x 4 accumulation" in resumed.stdout
    assert f"at step {stopped}," in resumed.stdout
    assert latest(run) == latest(ref_run) == "step_00000032"

    # the LR of every step (metrics, log_every=1; later lines win) and of the trace
    ref_lr = {m["step"]: m["lr"] for m in metrics(ref_run) if m["kind"] == "train"}
    lr = {m["step"]: m["lr"] for m in metrics(run) if m["kind"] == "train"}
    assert sorted(ref_lr) == list(range(1, 33)) and lr == ref_lr
    # the samples of every step: both ranks up to the checkpoint, then the one process
    ref_trace = [trace_steps(ref_run, r) for r in (0, 1)]
    before = [trace_steps(run, r, stopped) for r in (0, 1)]
    after = trace_steps(run, 0)
    for step in range(1, 33):
        want = sorted(ref_trace[0][step]["samples"] + ref_trace[1][step]["samples"])
        if step <= stopped:
            got = sorted(before[0][step]["samples"] + before[1][step]["samples"])
        else:
            got = sorted(after[step]["samples"])
        assert got == want and len(got) == 4, f"step {step}"
        assert after[step]["lr"] == ref_trace[0][step]["lr"] == ref_lr[step]

    # weights (not BatchNorm's running statistics: each rank keeps its own on CPU, where no SyncBN runs)
    def weights(d: Path) -> dict:
        state = torch.load(d / "checkpoints" / "step_00000032" / "mp_rank_00_model_states.pt",
                           map_location="cpu", weights_only=False)["module"]
        return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "tracked"))}

    a, b = weights(ref_run), weights(run)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    rel = (sum(((a[k] - b[k]) ** 2).sum() for k in a) / sum((a[k] ** 2).sum() for k in a)).item() ** 0.5
    # the first update after the resume: its gradient differs only by the order of the fp32 sums
    ref_m = {m["step"]: m for m in metrics(ref_run) if m["kind"] == "train"}
    new_m = {m["step"]: m for m in metrics(run) if m["kind"] == "train"}
    first = abs(new_m[stopped + 1]["grad_norm"] / ref_m[stopped + 1]["grad_norm"] - 1)
    loss_gap = max(abs(new_m[s]["loss"] - ref_m[s]["loss"]) for s in ref_m)
    print(f"2 processes vs 2 -> 1 after step {stopped}: grad norm of step {stopped + 1} {first:.2g} rel.; "
          f"final weights largest difference {worst:.3g}, relative norm {rel:.3g}; loss gap {loss_gap:.3g}")
    assert first < 1e-5, first
    # 32 - stopped further AdamW steps amplify those roundings (m / sqrt(v) of near-zero gradients)
    assert rel < 5e-3 and loss_gap < 1e-4, (worst, rel, loss_gap)


def test_nonfinite_loss_stops_and_keeps_the_good_checkpoint(trainer):
    config, run = trainer.config("nonfinite", data=NO_AUG, train={"epochs": 2},
                                 checkpoint={"every_steps": 2, "keep": 5}, ema={"enabled": False},
                                 metrics={"log_every": 1, "tensorboard": False, "progress": "lines"})
    check(trainer.run(config, nproc=1, overrides=["train.max_steps=4"]))
    assert latest(run) == "step_00000004"
    proc = trainer.run(config, nproc=1, overrides=["optim.lr=1e12", "optim.warmup_epochs=0"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite" in proc.stderr and "at step" in proc.stderr
    good = latest(run)
    meta = json.loads((run / "checkpoints" / good / "meta.json").read_text())
    weights = torch.load(run / "checkpoints" / good / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), meta


@pytest.mark.distributed
def test_a_dead_rank_ends_the_job(trainer):
    config, run = trainer.config("dead_peer", data=NO_AUG, train={"epochs": 20},
                                 metrics={"log_every": 1, "tensorboard": False, "progress": "lines"},
                                 checkpoint={"every_steps": 0, "keep": 1})
    proc = trainer.start(config)
    deadline = time.time() + 240
    while not any(m.get("step", 0) >= 2 for m in metrics(run) if m["kind"] == "train"):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.procs[1].kill()
    proc.procs[1].wait()
    rank0 = proc.procs[0]
    out, err = rank0.communicate(timeout=120)
    assert rank0.returncode == 1, err[-3000:]
    assert "at step" in err.strip().splitlines()[-1]


@pytest.mark.distributed
def test_a_hung_collective_times_out_naming_the_step(trainer):
    """Rank 1 frozen (SIGSTOP): rank 0, stuck in a collective, exits after the timeout naming the step."""
    config, run = trainer.config("hung_peer", data=NO_AUG, train={"epochs": 20, "collective_timeout_s": 15},
                                 metrics={"log_every": 1, "tensorboard": False, "progress": "lines"},
                                 checkpoint={"every_steps": 0, "keep": 1})
    proc = trainer.start(config)
    try:
        deadline = time.time() + 240
        while not any(m.get("step", 0) >= 2 for m in metrics(run) if m["kind"] == "train"):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        proc.procs[1].send_signal(signal.SIGSTOP)
        t = time.time()
        out, err = proc.procs[0].communicate(timeout=120)
        assert proc.procs[0].returncode == 1, err[-3000:]
        assert 10 < time.time() - t < 90
        last = err.strip().splitlines()[-1]
        # gloo's own timeout raises in the loop (message names the step), or, where the collective does
        # not raise, the watchdog ends the process (message names the phase and step)
        assert re.search(r"collective timed out at step \d+|(step \d+|evaluation|checkpoint).* did not "
                         r"finish .*collective_timeout_s=15", last), last
    finally:
        proc.kill()


def test_watchdog_ends_a_stuck_phase_naming_it():
    code = ("import time; from pipeline.train.loop import Watchdog; w = Watchdog(1.0, 3); "
            "w.enter('step 7 (epoch 0)'); time.sleep(30)")
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.time() - t < 20
    expected = "error: step 7 (epoch 0) did not finish on rank 3 within train.collective_timeout_s=1s"
    assert expected in proc.stderr
