"""The training loop: steps, EMA, LR schedule, evaluation, checkpoint triggers, signals and guard rails.

Determinism (exact resume): before every micro-step the torch RNG is reseeded from
(seed, optimizer step, micro-step, rank), so DropPath and anything else drawing from torch's RNG
depends only on the position in training, never on what ran before in this process. Augmentation
and Mixup are seeded per sample/batch by the loader; the LR is a pure function of the position.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.errors import EXIT_FINISHED, EXIT_REQUEUE, PipelineError
from pipeline.train import checkpoint as ckpt
from pipeline.train import distributed
from pipeline.train.config import Config, ConfigError
from pipeline.train.engine import peak_lr
from pipeline.train.evaluate import evaluate
from pipeline.train.metrics import BestSoFar, MetricsWriter, max_memory_gb, mfu
from pipeline.train.schedule import BatchPlan, lr_at
from pipeline.train.trace import SampleTrace


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on (non-finite loss, hung or dead peer); the message names the step."""


class StopFlag:
    """Set by SIGUSR1/SIGTERM/SIGINT; the loop acts on it at the end of the current optimizer step.

    A second SIGINT (Ctrl-C twice) ends the process at once: a save in flight is left incomplete,
    which never touches `latest` or the previous checkpoint.
    """

    def __init__(self):
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            print("interrupted again: stopping now without saving (the last checkpoint is intact)",
                  file=sys.stderr, flush=True)
            os._exit(130)
        if signum == signal.SIGINT:
            print("interrupted: saving a checkpoint at the end of this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self.requested = True


class Watchdog:
    """Ends this process (exit 1) when one phase - a step, an evaluation, a save - outlasts `timeout_s`.

    A hung collective does not always raise (gloo waits on a live but stopped peer; NCCL's own watchdog
    aborts without saying where), so a thread names the phase and step and exits; the other ranks then
    see a dead peer and exit too, and the launcher can restart the job from the last checkpoint.
    """

    def __init__(self, timeout_s: float, rank: int, world_size: int = 1):
        self.timeout_s = timeout_s
        self.rank = rank
        self.period_s = min(5.0, timeout_s / 5)
        # with peers: a heartbeat every period, so a hung phase can name the ranks that went silent
        self.heartbeats = distributed.Heartbeats(rank, world_size, self.period_s) if world_size > 1 else None
        self.state: tuple[str, float] | None = None
        threading.Thread(target=self._watch, daemon=True, name="collective-watchdog").start()

    def enter(self, phase: str) -> None:
        self.state = (phase, time.monotonic())

    def _watch(self) -> None:
        while True:
            time.sleep(self.period_s)
            if self.heartbeats is not None:
                self.heartbeats.beat()
            state = self.state
            if state is not None and time.monotonic() - state[1] > self.timeout_s:
                peers = "another rank is stuck or dead" if self.heartbeats is None else \
                    self.heartbeats.silent(3 * self.period_s)
                print(f"error: {state[0]} did not finish on rank {self.rank} within "
                      f"train.collective_timeout_s={self.timeout_s:g}s: a collective is hung ({peers}); "
                      f"restart from the last checkpoint", file=sys.stderr, flush=True)
                os._exit(1)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + micro * 104_729 + rank * 15_485_863) % (2**63 - 1)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    logits = logits.float()
    if targets.ndim == 2:  # Mixup/CutMix soft targets (label smoothing already folded in)
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


@dataclass
class Position:
    """Where training stands; saved in the checkpoint's client state."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches done in `epoch`, at `world_size` and `micro_batch`
    world_size: int = 1
    micro_batch: int = 1

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                "world_size": self.world_size, "micro_batch": self.micro_batch}


class Trainer:
    def __init__(self, cfg: Config, plan: BatchPlan, engine, optimizer, ema, train_loader, val_loader,
                 device: torch.device, output_dir: Path, flops_per_image: float, stop: StopFlag, run_id: str):
        self.cfg = cfg
        self.plan = plan
        self.engine = engine
        self.optimizer = optimizer  # the client AdamW whose groups get the LR of each update
        self.ema = ema
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = device
        self.output_dir = output_dir
        self.ckpt_dir = output_dir / "checkpoints"
        self.flops = flops_per_image
        self.stop = stop
        self.run_id = run_id
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.accum = plan.grad_accum
        self.steps_per_epoch = len(train_loader) // self.accum
        if self.steps_per_epoch < 1:
            raise ConfigError(f"the train split has {train_loader.num_samples} samples, fewer than "
                              f"train.global_batch={plan.global_batch}: lower train.global_batch")
        if cfg.train.nonfinite == "skip" and self.accum != 1:
            raise ConfigError(f"config key 'train.nonfinite': 'skip' needs no gradient accumulation, but "
                              f"{plan.global_batch} on {self.world} ranks accumulates {self.accum} "
                              f"micro-batches (a skipped one would shift DeepSpeed's boundary): use 'stop' "
                              f"or raise train.max_batch_per_device")
        self.trace = SampleTrace(output_dir, self.rank) if cfg.data.trace else None
        self.best = BestSoFar()
        self.watchdog = Watchdog(cfg.train.collective_timeout_s, self.rank, self.world)
        self.pos = Position(world_size=self.world, micro_batch=plan.micro_batch)
        self.loader_state: dict | None = None
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

    # ---- checkpoint state -------------------------------------------------------------------
    def restore(self, client_state: dict, rank_state: dict, ema_state: dict | None) -> None:
        old = client_state["position"]
        self.pos.step, self.pos.epoch = old["step"], old["epoch"]
        self.best.state = dict(client_state.get("best", {}))
        # micro-batches of the epoch already done, at this world size and micro-batch, on an accumulation
        # boundary (the loader continues from the exact sample position; DeepSpeed counts micro-steps from
        # 0). With the global batch fixed, a step boundary there is a step boundary here.
        seen = old["micro_in_epoch"] * old["world_size"] * old.get("micro_batch", self.plan.micro_batch)
        self.pos.micro_in_epoch = seen // (self.world * self.plan.micro_batch) // self.accum * self.accum
        self.loader_state = rank_state["loader"] if old["micro_in_epoch"] else None
        if old["world_size"] == self.world:
            set_rng_state(rank_state["rng"])
        if self.ema is not None:
            if ema_state is None:
                raise ckpt.CheckpointError("checkpoint has no EMA (ema.pt) but ema.enabled=true: "
                                           "set ema.enabled=false or resume from a run with EMA")
            self.ema.load_full_state_dict(ema_state)

    def _set_lr(self) -> float:
        """Set every client optimizer group to the next update's LR, a pure function of the position."""
        o = self.cfg.optim
        lr = lr_at(o.schedule, epoch=self.pos.epoch, update=self._num_updates(),
                   steps_per_epoch=self.steps_per_epoch, peak=peak_lr(self.cfg), warmup_lr=o.warmup_lr,
                   min_lr=o.min_lr, warmup_epochs=o.warmup_epochs, epochs=self.cfg.train.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _num_updates(self) -> int:
        return self.pos.epoch * self.steps_per_epoch + self.pos.micro_in_epoch // self.accum

    def _params_finite(self) -> bool:
        ok = all(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p).all()
                 for p in self.engine.module.parameters())
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def save(self) -> str:
        self.watchdog.enter(f"checkpoint save at step {self.pos.step}")
        if not self._params_finite():
            raise TrainingError(f"non-finite weights at step {self.pos.step}: not saving over the last good "
                                f"checkpoint ({ckpt.read_latest(self.ckpt_dir)})")
        ema_state = self.ema.full_state_dict() if self.ema is not None else None
        client = {"position": self.pos.to_dict(), "best": self.best.state}
        rank_state = {"loader": self.train_loader.state_dict(), "rng": rng_state()}
        return ckpt.save(self.engine, self.ckpt_dir, self.pos.step, self.cfg, client, rank_state,
                         ema_state if self.rank == 0 else None,
                         {"epoch": self.pos.epoch, "micro_in_epoch": self.pos.micro_in_epoch}, self.run_id)

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        self.engine.eval()
        try:
            res = evaluate(self.engine, self.val_loader, self.device)
            out = {"top1": res["top1"], "top5": res["top5"], "loss": res["loss"]}
            if self.ema is not None:
                with self.ema.swap(self.engine):
                    res = evaluate(self.engine, self.val_loader, self.device)
                out.update({"ema_top1": res["top1"], "ema_top5": res["top5"], "ema_loss": res["loss"]})
        finally:
            self.engine.train()
        return out

    # ---- the loop -------------------------------------------------------------------------------
    def _agree(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """One small all_reduce per micro-step: (any rank asked to stop, any rank's loss non-finite)."""
        flags = torch.stack([torch.tensor(float(self.stop.requested), device=loss.device),
                             (~torch.isfinite(loss.detach())).float()])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad = flags.tolist()
        return stop > 0, bad > 0

    def run(self, writer: MetricsWriter) -> int:
        cfg = self.cfg
        smoothing = cfg.data.smoothing
        window = {"loss": 0.0, "n": 0, "images": 0, "wait": 0.0, "t0": time.perf_counter()}
        self.engine.train()
        try:
            while self.pos.epoch < cfg.train.epochs and not self._max_steps_reached():
                self.train_loader.set_epoch(self.pos.epoch)
                if self.loader_state is not None:
                    self.train_loader.load_state_dict(self.loader_state)
                    self.loader_state = None
                micro_limit = self.steps_per_epoch * self.accum
                it = iter(self.train_loader)
                exhausted = False
                while self.pos.micro_in_epoch < micro_limit:
                    self.watchdog.enter(f"step {self.pos.step + 1} (epoch {self.pos.epoch})")
                    t_wait = time.perf_counter()
                    try:
                        images, targets = next(it)
                    except StopIteration:
                        # after a resume at another world size the loader's exact sample position may
                        # end the epoch a micro-batch before our rounded count does (same on all ranks)
                        exhausted = True
                        break
                    window["wait"] += time.perf_counter() - t_wait
                    if self.pos.micro_in_epoch % self.accum == 0:  # the first micro-batch of an update
                        lr = self._set_lr()
                        if self.trace is not None:
                            self.trace.begin(self.pos.step + 1, self.pos.epoch, lr)
                    if self.trace is not None:
                        self.trace.add(self.train_loader.last_samples)
                    torch.manual_seed(step_seed(cfg.seed, self.pos.step, self.pos.micro_in_epoch, self.rank))
                    loss = loss_fn(self.engine(images), targets, smoothing)
                    stop, bad = self._agree(loss)
                    self.pos.micro_in_epoch += 1
                    if bad:
                        if cfg.train.nonfinite == "stop":
                            raise TrainingError(
                                f"non-finite loss at step {self.pos.step} (epoch {self.pos.epoch}); the last "
                                f"good checkpoint is {ckpt.read_latest(self.ckpt_dir)}. Lower optim.lr, "
                                f"enable optim.clip_grad, or set train.nonfinite=skip")
                        if self.rank == 0:
                            print(f"warning: non-finite loss at step {self.pos.step}: micro-batch skipped",
                                  flush=True)
                    else:
                        self.engine.backward(loss)
                        window["loss"] += loss.item()
                        window["n"] += 1
                    window["images"] += images.shape[0]
                    before = self.engine.global_steps
                    if not bad:
                        self.engine.step()
                    if self.pos.micro_in_epoch % self.accum:
                        continue
                    if self.engine.global_steps != before:
                        self.pos.step += 1
                        if self.ema is not None:
                            self.ema.update()
                    if self.trace is not None:
                        self.trace.end()
                    writer.advance(self.pos.step)
                    if self.pos.step % cfg.metrics.log_every == 0:
                        self._log(writer, window)
                    if stop:
                        self.save()
                        writer.write({"kind": "end", "step": self.pos.step, "epoch": self.pos.epoch,
                                      "reason": "signal"})
                        return EXIT_REQUEUE
                    if self._max_steps_reached():
                        break
                    if (cfg.checkpoint.every_steps and self.pos.step % cfg.checkpoint.every_steps == 0
                            and self.pos.micro_in_epoch < micro_limit):  # else the epoch-end save follows
                        self.save()
                        window["t0"] = time.perf_counter()  # a save is not step time
                getattr(it, "close", lambda: None)()  # stops loader workers of an unfinished pass
                if self.pos.micro_in_epoch >= micro_limit or exhausted:
                    self.pos.epoch += 1
                    self.pos.micro_in_epoch = 0
                    if cfg.train.eval_every_epochs and self.pos.epoch % cfg.train.eval_every_epochs == 0:
                        self.watchdog.enter(f"evaluation after epoch {self.pos.epoch}")
                        res = self.evaluate()
                        writer.write({"kind": "eval", "step": self.pos.step, "epoch": self.pos.epoch, **res,
                                      **self.best.update(self.pos.epoch, res)})
                self.save()
                window["t0"] = time.perf_counter()
        except RuntimeError as e:
            if isinstance(e, TrainingError):
                raise
            text = str(e).lower()
            if "timed out" in text or "timeout" in text:
                raise TrainingError(f"a collective timed out at step {self.pos.step} (rank {self.rank}): "
                                    f"another rank is hung or dead ({str(e).splitlines()[0]})") from e
            if "connection" in text or "peer" in text:
                raise TrainingError(f"lost a peer at step {self.pos.step} (rank {self.rank}): "
                                    f"{str(e).splitlines()[0]}") from e
            raise
        writer.write({"kind": "end", "step": self.pos.step, "epoch": self.pos.epoch, "reason": "finished"})
        return EXIT_FINISHED

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.pos.step >= self.cfg.train.max_steps

    def _log(self, writer: MetricsWriter, window: dict) -> None:
        stats = torch.tensor([window["loss"], float(window["n"])], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        images = window["images"] * self.world
        steps = max(1, window["images"] // (self.plan.micro_batch * self.accum))
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        ips = images / elapsed
        writer.write({
            "kind": "train", "step": self.pos.step, "epoch": self.pos.epoch,
            "loss": stats[0].item() / max(stats[1].item(), 1.0),
            "lr": self.engine.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
            "images_per_s": ips, "images_per_s_per_device": ips / self.world,
            "step_time_s": elapsed / steps, "data_wait_frac": min(1.0, window["wait"] / elapsed),
            "mfu": mfu(ips, self.flops, self.world, self.cfg.metrics.peak_tflops),
            "max_mem_gb": max_memory_gb(self.device),
        })
        window.update({"loss": 0.0, "n": 0, "images": 0, "wait": 0.0, "t0": time.perf_counter()})
