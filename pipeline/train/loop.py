"""The training loop: `Trainer.train_step` (model, loss and engine meet), the epoch loop, EMA, LR,
evaluation, checkpoint triggers, signals and guard rails.

Where training stands is the train loader's position (epoch, samples seen) plus the count of optimizer
steps; the micro-batch index, the LR and the epoch boundary are derived from it (`Position`), at save
and at resume alike: checkpoints keep the loader's state, never a second copy of the position.
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

from pipeline.errors import EXIT_FINISHED, EXIT_REQUEUE, PipelineError
from pipeline.train import checkpoint as ckpt
from pipeline.train import distributed
from pipeline.train.build import peak_lr
from pipeline.train.config import Config, ConfigError
from pipeline.train.engines import Engine
from pipeline.train.evaluate import evaluate
from pipeline.train.losses import Loss
from pipeline.train.metrics import BestSoFar, MetricsWriter, max_memory_gb, mfu
from pipeline.train.run_dir import RunDir
from pipeline.train.running_stats import RankLocalStats
from pipeline.train.schedule import BatchPlan, lr_at
from pipeline.train.trace import SampleTrace

STOP_REQUEST_ENV = "RMT_STOP_REQUEST"


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on (non-finite loss, hung or dead peer); the message names the step."""


class StopFlag:
    """Set by SIGUSR1/SIGTERM/SIGINT; the loop acts on it at the end of the current optimizer step.

    A second SIGINT (Ctrl-C twice) ends the process at once: a save in flight is left incomplete,
    which never touches `latest` or the previous checkpoint. A signal that reached the launcher before
    this process could catch it is left in the file `$RMT_STOP_REQUEST` names (launch/common.sh), read
    once the handlers are in: what came before is in the file, what comes after reaches the handler.
    """

    def __init__(self):
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)
        request = os.environ.get(STOP_REQUEST_ENV)
        if request and os.path.exists(request):
            self.requested = True

    @staticmethod
    def release() -> None:
        """The run is over: a late SIGUSR1 (a time-limit warning during shutdown) is ignored from now on.
        Python resets the handlers it set to the default action at exit, and USR1's default kills."""
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

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


@dataclass(frozen=True)
class Position:
    """Where an epoch stands, derived from the train loader's (epoch, samples seen): never counted."""
    epoch: int
    micro_in_epoch: int  # micro-batches done in `epoch`, at this world size and micro-batch

    @staticmethod
    def micro_batches(samples_seen: int, plan: BatchPlan) -> int:
        """Micro-batches that `samples_seen` samples of an epoch (all ranks together) make under `plan`."""
        return samples_seen // (plan.world_size * plan.micro_batch)

    @classmethod
    def of(cls, epoch: int, samples_seen: int, plan: BatchPlan, steps_per_epoch: int) -> Position:
        """An epoch whose steps are all done counts as the next one, at its start."""
        micro = cls.micro_batches(samples_seen, plan)
        if micro >= steps_per_epoch * plan.grad_accum:
            return cls(epoch + 1, 0)
        return cls(epoch, micro)


@dataclass
class StepResult:
    """One micro-step: its loss (on the device, never synced here) and what happened."""
    loss: torch.Tensor
    images: int
    finite: bool  # every rank's loss was finite (else the micro-batch was skipped)
    stop: bool  # some rank was asked to stop
    boundary: bool  # the last micro-batch of an update
    stepped: bool  # the engine made an optimizer step


class Window:
    """The micro-steps since the last train record: loss summed on the device (no per-step sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n, self.images, self.wait, self.t0 = 0, 0, 0.0, time.perf_counter()

    def add(self, result: StepResult) -> None:
        if result.finite:
            self.loss += result.loss.double()
            self.n += 1
        self.images += result.images


def peer_loss(e: RuntimeError, step: int, rank: int) -> TrainingError | None:
    """A collective's error that means another rank is hung or dead, as one line; None for anything else."""
    text, first = str(e).lower(), str(e).splitlines()[0] if str(e) else type(e).__name__
    if "timed out" in text or "timeout" in text:
        return TrainingError(f"a collective timed out at step {step} (rank {rank}): another rank is hung or "
                             f"dead ({first})")
    if "connection" in text or "peer" in text:
        return TrainingError(f"lost a peer at step {step} (rank {rank}): {first}")
    return None


class Trainer:
    def __init__(self, cfg: Config, plan: BatchPlan, engine: Engine, loss: Loss, ema, train_loader,
                 val_loader, device: torch.device, output_dir: Path, flops_per_image: float, stop: StopFlag,
                 run_id: str):
        self.cfg = cfg
        self.plan = plan
        self.engine = engine
        self.loss = loss
        self.ema = ema
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = device
        self.output_dir = output_dir
        self.ckpt_dir = RunDir(output_dir).checkpoints
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
        self.window = Window(device)
        self.running_stats = RankLocalStats(engine.module, ema)
        self.step = 0  # optimizer steps done
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

    def position(self) -> Position:
        return Position.of(self.train_loader.epoch, self.train_loader.samples_seen, self.plan,
                           self.steps_per_epoch)

    # ---- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Collective (the EMA is gathered): `client` goes into the engine's files, `rank` into this rank's
        trainer file, `ema` (consolidated) into ema.pt. Where the epoch stands is the loader's state only.

        `client["position"]` keeps its name (and earlier checkpoints' extra fields, ignored) so that
        every checkpoint loads."""
        position = {"step": self.step, "world_size": self.world}
        return {"client": {"position": position, "best": self.best.state},
                "rank": {"loader": self.train_loader.state_dict(), "rng": rng_state(),
                         "running_stats": self.running_stats.state_dict()},
                "ema": self.ema.full_state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        saved = state["client"]["position"]
        self.step = saved["step"]
        self.best.state = dict(state["client"].get("best", {}))
        loader = state["rank"]["loader"]
        pos = Position.of(loader["epoch"], loader["samples_seen"], self.plan, self.steps_per_epoch)
        if loader["samples_seen"] and pos.epoch == loader["epoch"]:  # mid-epoch: continue at its sample
            self.train_loader.load_state_dict(loader)
            if self.train_loader.samples_seen % self.plan.global_batch:
                raise ConfigError(f"the checkpoint stopped after {self.train_loader.samples_seen} samples of "
                                  f"epoch {pos.epoch}, not a whole number of train.global_batch="
                                  f"{self.plan.global_batch} steps: resume with the global batch it was "
                                  f"made with")
        else:  # at an epoch's start (an epoch whose steps are all done counts as the next one)
            self.train_loader.set_epoch(pos.epoch)
        if saved["world_size"] == self.world:
            set_rng_state(state["rank"]["rng"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ckpt.CheckpointError("checkpoint has no EMA (ema.pt) but ema.enabled=true: "
                                           "set ema.enabled=false or resume from a run with EMA")
            self.ema.load_full_state_dict(state["ema"])
        if saved["world_size"] == self.world:  # else every rank keeps the saved average
            self.running_stats.load_state_dict(state["rank"].get("running_stats", {}))

    def _params_finite(self) -> bool:
        ok = all(torch.isfinite(self.engine.local_shard(p)).all() for p in self.engine.module.parameters())
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def save(self) -> str:
        self.watchdog.enter(f"checkpoint save at step {self.step}")
        if not self._params_finite():
            raise TrainingError(f"non-finite weights at step {self.step}: not saving over the last good "
                                f"checkpoint ({ckpt.read_latest(self.ckpt_dir)})")
        pos = self.position()  # in meta.json for people (and tests): derived, never read back
        with self.running_stats.averaged():  # the model saved is the model evaluated
            return ckpt.save(self.engine, self.ckpt_dir, self.step, self.cfg, self.state_dict(), self.run_id,
                             {"epoch": pos.epoch, "micro_in_epoch": pos.micro_in_epoch})

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        with self.running_stats.averaged():
            return self._evaluate()

    def _evaluate(self) -> dict:
        self.engine.eval()
        try:
            res = evaluate(self.engine, self.val_loader, self.device)
            out = {"top1": res["top1"], "top5": res["top5"], "loss": res["loss"]}
            if self.ema is not None:
                with self.ema.swap():
                    res = evaluate(self.engine, self.val_loader, self.device)
                out.update({"ema_top1": res["top1"], "ema_top5": res["top5"], "ema_loss": res["loss"]})
        finally:
            self.engine.train()
        return out

    # ---- one micro-step -------------------------------------------------------------------------
    def train_step(self, batch) -> StepResult:
        """One micro-batch `(images, targets, ...)` just taken from the train loader: LR at an update's
        start, seeding, forward, loss, the stop/non-finite agreement, backward and the engine's step.

        A per-batch device transform (e.g. decoding on the device) belongs before `self.engine(...)`."""
        epoch = self.train_loader.epoch
        micro = Position.micro_batches(self.train_loader.samples_seen, self.plan) - 1  # this batch
        if micro % self.accum == 0:  # the first micro-batch of an update
            lr = self._set_lr(epoch, micro)
            if self.trace is not None:
                self.trace.begin(self.step + 1, epoch, lr)
        if self.trace is not None:
            self.trace.add(self.train_loader.last_samples)
        torch.manual_seed(step_seed(self.cfg.seed, self.step, micro, self.rank))
        loss = self.loss(self.engine(batch[0]), batch)
        stop, finite = self._agree(loss)
        if finite:
            self.engine.backward(loss)
        elif self.cfg.train.nonfinite == "stop":
            raise TrainingError(f"non-finite loss at step {self.step} (epoch {epoch}); the last good "
                                f"checkpoint is {ckpt.read_latest(self.ckpt_dir)}. Lower optim.lr, enable "
                                f"optim.clip_grad, or set train.nonfinite=skip")
        elif self.rank == 0:
            print(f"warning: non-finite loss at step {self.step}: micro-batch skipped", flush=True)
        stepped = self.engine.step() if finite else False
        if stepped:
            self.step += 1
            if self.ema is not None:
                self.ema.update()
        return StepResult(loss.detach(), batch[0].shape[0], finite, stop, (micro + 1) % self.accum == 0,
                          stepped)

    def _set_lr(self, epoch: int, micro: int) -> float:
        """Set every client optimizer group to the next update's LR, a pure function of the position."""
        o = self.cfg.optim
        lr = lr_at(o.schedule, epoch=epoch, update=epoch * self.steps_per_epoch + micro // self.accum,
                   steps_per_epoch=self.steps_per_epoch, peak=peak_lr(self.cfg), warmup_lr=o.warmup_lr,
                   min_lr=o.min_lr, warmup_epochs=o.warmup_epochs, epochs=self.cfg.train.epochs)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _agree(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """One small all_reduce per micro-step: (any rank asked to stop, every rank's loss finite)."""
        flags = torch.stack([torch.tensor(float(self.stop.requested), device=loss.device),
                             (~torch.isfinite(loss.detach())).float()])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad = flags.tolist()
        return stop > 0, bad == 0

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, writer: MetricsWriter) -> int:
        """Epochs until done; returns the exit code (EXIT_REQUEUE after a signal's checkpoint)."""
        self.engine.train()
        try:
            while self.position().epoch < self.cfg.train.epochs and not self._max_steps_reached():
                epoch = self.position().epoch
                if self._train_epoch(writer, epoch):
                    writer.write({"kind": "end", "step": self.step, "epoch": epoch, "reason": "signal"})
                    return EXIT_REQUEUE
                done, every = self.position().epoch, self.cfg.train.eval_every_epochs
                if done > epoch and every and done % every == 0:
                    self.watchdog.enter(f"evaluation after epoch {done}")
                    res = self.evaluate()
                    writer.write({"kind": "eval", "step": self.step, "epoch": done, **res,
                                  **self.best.update(done, res)})
                self.save()
                self.window.t0 = time.perf_counter()
        except RuntimeError as e:
            error = None if isinstance(e, TrainingError) else peer_loss(e, self.step, self.rank)
            if error is None:
                raise
            raise error from e
        writer.write({"kind": "end", "step": self.step, "epoch": self.position().epoch, "reason": "finished"})
        return EXIT_FINISHED

    def _train_epoch(self, writer: MetricsWriter, epoch: int) -> bool:
        """The steps of `epoch` from where its loader stands, until its last step or max_steps; True when
        stopped on a signal (the checkpoint saved)."""
        self.train_loader.set_epoch(epoch)
        it = iter(self.train_loader)
        try:
            while self.position().epoch == epoch:
                self.watchdog.enter(f"step {self.step + 1} (epoch {epoch})")
                t_wait = time.perf_counter()
                batch = next(it)
                self.window.wait += time.perf_counter() - t_wait
                result = self.train_step(batch)
                self.window.add(result)
                if not result.boundary:
                    continue
                if self.trace is not None:
                    self.trace.end()
                writer.advance(self.step)
                if self.step % self.cfg.metrics.log_every == 0:
                    self._log(writer, epoch)
                if result.stop:
                    self.save()
                    return True
                if self._max_steps_reached():
                    break
                if (self.cfg.checkpoint.every_steps and self.step % self.cfg.checkpoint.every_steps == 0
                        and self.position().epoch == epoch):  # else the epoch-end save follows
                    self.save()
                    self.window.t0 = time.perf_counter()  # a save is not step time
        finally:
            getattr(it, "close", lambda: None)()  # stops loader workers of an unfinished pass
        return False

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.step >= self.cfg.train.max_steps

    def _log(self, writer: MetricsWriter, epoch: int) -> None:
        w = self.window
        stats = torch.stack([w.loss, torch.tensor(float(w.n), dtype=torch.float64, device=self.device)])
        dist.all_reduce(stats)
        elapsed = max(time.perf_counter() - w.t0, 1e-9)
        images = w.images * self.world
        steps = max(1, w.images // (self.plan.micro_batch * self.accum))
        ips = images / elapsed
        writer.write({
            "kind": "train", "step": self.step, "epoch": epoch,
            "loss": stats[0].item() / max(stats[1].item(), 1.0),
            "lr": self.engine.lr(), "grad_norm": self.engine.grad_norm(),
            "images_per_s": ips, "images_per_s_per_device": ips / self.world,
            "step_time_s": elapsed / steps, "data_wait_frac": min(1.0, w.wait / elapsed),
            "mfu": mfu(ips, self.flops, self.world, self.cfg.metrics.peak_tflops),
            "max_mem_gb": max_memory_gb(self.device),
        })
        w.reset()
