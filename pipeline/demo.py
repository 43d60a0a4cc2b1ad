"""The `demo` command (`make demo`): every part of the pipeline end to end on a CPU, in minutes.

    python -m pipeline demo [--format wds|ffcv] [dotted.key=value ...]

fake ImageNet -> shards (WebDataset and FFCV) -> RMT-T trained by 2 CPU processes under DeepSpeed,
started through launch/local.sh as users start it -> SIGTERM in the middle of an epoch (checkpoint,
exit 75) -> the same command again resumes and finishes -> eval of the model and its EMA -> export
-> report (plots, summary.md) -> a summary with the paths and the next commands to try.
Each step prints the command a user would type for it. The run dir starts fresh on every demo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import EXIT_REQUEUE, PipelineError
from pipeline.train.run_dir import CONFIG_FILE, RunDir

REPO = Path(__file__).resolve().parents[1]


class DemoError(PipelineError, RuntimeError):
    """A demo step failed; the message names the step and where its output is."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="wds", choices=("wds", "ffcv"),
                        help="loader: WebDataset shards or FFCV .beton files (default: %(default)s)")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"),
                        help="training recipe (default: configs/demo.yaml)")
    parser.add_argument("--data", default="data/demo", help="fake ImageNet folder (default: %(default)s)")
    parser.add_argument("--shards", default="shards/demo", help="shards folder (default: %(default)s)")
    parser.add_argument("--run-dir", help="run dir, recreated (default: runs/demo-FORMAT)")
    parser.add_argument("--classes", type=int, default=10, help="fake classes (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=40, help="default: %(default)s")
    parser.add_argument("--val-per-class", type=int, default=10, help="default: %(default)s")
    parser.add_argument("--max-side", type=int, default=160,
                        help="largest usual side of the fake images in px (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (default: %(default)s)")
    parser.add_argument("--min-top1", type=float,
                        help="fail unless model and EMA top-1 (%%) reach this (default: 3x chance)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted.key=value training overrides, e.g. train.epochs=4")


def _say(text: str) -> None:
    print(f"\n[demo] {text}", flush=True)


def _check(proc: subprocess.CompletedProcess | int, what: str, want: int = 0) -> None:
    code = proc if isinstance(proc, int) else proc.returncode
    if code != want:
        raise DemoError(f"{what} exited with {code} (expected {want}); its output is above")


def _python(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", *args]
    print("$ python -m pipeline " + " ".join(args), flush=True)
    return subprocess.run(cmd, cwd=os.getcwd(), text=True, stdout=subprocess.PIPE if capture else None)


def _records(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out


def _fresh(path: Path, marker: str, option: str) -> None:
    """Remove a previous demo's `path` (recognised by `marker` inside it), so every demo starts clean."""
    if not path.exists() or not any(path.iterdir()):
        return
    if not (path / marker).exists():
        raise DemoError(f"{option} {path} exists and was not written by the demo (no {marker}): pass another "
                        f"{option}")
    print(f"[demo] removing the previous demo's {path}", flush=True)
    shutil.rmtree(path)


class Launch:
    """launch/local.sh with the demo's settings: start, wait, SIGTERM (what Ctrl-C/preemption sends)."""

    def __init__(self, args: argparse.Namespace, run_dir: Path, shards: Path):
        self.env = {**os.environ, "NPROC": str(args.nproc), "CONFIG": str(Path(args.config).resolve()),
                    "RUN_DIR": str(run_dir), "SHARDS": str(shards), "PYTHON": sys.executable,
                    "DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
        self.env.pop("RANK", None)  # a demo run inside another distributed job starts its own ranks
        self.argv = [str(REPO / "launch" / "local.sh"), *train_overrides(args)]
        shown = " ".join(f"{k}={self.env[k]}" for k in ("NPROC", "CONFIG", "RUN_DIR", "SHARDS"))
        self.shown = f"$ {shown} launch/local.sh {' '.join(self.argv[1:])}"

    def start(self) -> subprocess.Popen:
        print(self.shown, flush=True)
        return subprocess.Popen(self.argv, env=self.env, cwd=REPO)


def train_overrides(args: argparse.Namespace) -> list[str]:
    return [f"data.format={args.format}", f"model.num_classes={args.classes}", "metrics.progress=lines",
            *args.overrides]


def check_config(args: argparse.Namespace):
    """The training config as the demo will run it (so that errors come before any work)."""
    from pipeline.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, train_overrides(args))
    except ConfigError as e:
        raise DemoError(str(e)) from None
    if cfg.train.epochs < 2 or cfg.train.eval_every_epochs != 1 or cfg.train.max_steps:
        raise DemoError("the demo stops training in the middle of an epoch after the first evaluation: it "
                        "needs train.epochs >= 2, train.eval_every_epochs=1 and train.max_steps=0")
    return cfg


def _wait(proc: subprocess.Popen) -> int:
    """Wait for `proc`; Ctrl-C reaches it too (same process group), so wait for its checkpoint."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            print("[demo] Ctrl-C: waiting for training to save its checkpoint", flush=True)


def train_with_interruption(launch: Launch, run_dir: Path, epochs: int, poll_s: float = 0.1) -> dict:
    """First start, SIGTERM in the middle of epoch max(1, epochs // 2), resume, finish.
    Returns {"steps_per_epoch", "stop_step", "stop_epoch", "final_step"}."""
    spe = stop_at = None
    proc = launch.start()
    signalled = False
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
            recs = _records(run_dir)
            evals = [r for r in recs if r["kind"] == "eval"]
            if stop_at is None and evals:
                spe = evals[0]["step"] // evals[0]["epoch"]  # evaluation follows every epoch
                stop_at = spe * max(1, epochs // 2) + max(1, spe // 2)
            if not signalled and stop_at is not None and any(
                    r["kind"] == "train" and r["step"] >= stop_at for r in recs):
                _say(f"step {stop_at} reached: sending SIGTERM to launch/local.sh, as a preemption would "
                     "(workers save a checkpoint and exit 75)")
                proc.send_signal(signal.SIGTERM)
                signalled = True
    except KeyboardInterrupt:  # the launcher got Ctrl-C too and checkpoints
        _wait(proc)
        raise DemoError("interrupted by Ctrl-C; `make demo` again starts a fresh demo") from None
    code = _wait(proc)
    if not signalled:
        if code != 0:
            raise DemoError(f"training (launch/local.sh) failed with exit {code}; its output is above")
        raise DemoError("training finished before the demo could interrupt it (give it more epochs: "
                        "train.epochs=...)")
    _check(code, "the interrupted training (launch/local.sh)", EXIT_REQUEUE)
    print("[demo] (torchrun reports the workers' exit 75 above as a failure: 75 means 'checkpoint saved, "
          "requeue me', which local.sh reports as such)", flush=True)
    ends = [r for r in _records(run_dir) if r["kind"] == "end"]
    assert spe is not None  # set before the signal
    if not ends or ends[-1]["reason"] != "signal":
        raise DemoError(f"no 'signal' end record in {RunDir(run_dir).metrics} after the SIGTERM")
    stop = ends[-1]
    _say(f"stopped at step {stop['step']} (epoch {stop['epoch']}); checkpoint "
         f"{RunDir(run_dir).resume_point()}. Resuming with the same command:")
    _check(_wait(launch.start()), "the resumed training (launch/local.sh)")
    return {"steps_per_epoch": spe, "stop_step": stop["step"], "stop_epoch": stop["epoch"],
            "final_step": _records(run_dir)[-1]["step"]}


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from pipeline.report import ReportError, write_report

    t0 = time.time()
    data, shards = Path(args.data).resolve(), Path(args.shards).resolve()
    run_dir = Path(args.run_dir or f"runs/demo-{args.format}").resolve()
    cfg = check_config(args)
    for path, marker, option in ((data, "folders", "--data"), (shards, "manifest.json", "--shards"),
                                 (run_dir, CONFIG_FILE, "--run-dir")):
        _fresh(path, marker, option)

    _say(f"1/6 fake ImageNet: {args.classes} learnable classes (shape, colour, texture) in ImageNet's layout")
    _check(_python("fake-imagenet", "--out", str(data), "--layouts", "folders",
                   "--classes", str(args.classes), "--train-per-class", str(args.train_per_class),
                   "--val-per-class", str(args.val_per_class),
                   "--min-side", str(min(64, args.max_side)), "--max-side", str(args.max_side)),
           "fake-imagenet")

    _say("2/6 shards in both formats (what `make shards SRC=... OUT=...` runs)")
    _check(_python("shards", "--src", str(data / "folders"), "--out", str(shards), "--formats", "wds", "ffcv",
                   "--classes", str(args.classes), "--workers", "1", "--no-progress"), "shards")

    _say(f"3/6 training RMT-T with {args.nproc} CPU processes under DeepSpeed ({args.format} loader), "
         "interrupted mid-epoch, then resumed")
    t_train = time.time()
    info = train_with_interruption(Launch(args, run_dir, shards), run_dir, cfg.train.epochs)
    t_train = time.time() - t_train

    _say("4/6 evaluating the final checkpoint: model and EMA weights")
    results = {}
    for name, extra in (("model", []), ("EMA", ["--ema"])):
        proc = _python("eval", "--checkpoint", str(run_dir), *extra, capture=True)
        _check(proc, f"eval of the {name}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(proc.stdout.strip().splitlines()[-1], flush=True)

    _say("5/6 exporting consolidated fp32 weights (safetensors, loadable with timm.create_model)")
    exported = {}
    for name, extra in (("model", []), ("EMA", ["--ema"])):
        out = run_dir / "export" / f"{cfg.model.name}_demo{'_ema' if extra else ''}.safetensors"
        _check(_python("export", str(run_dir), "--out", str(out), *extra), f"export of the {name}")
        exported[name] = out

    _say("6/6 report: plots and summary")
    print(f"$ python -m pipeline report {run_dir}", flush=True)
    try:
        report = write_report(run_dir)
    except ReportError as e:
        raise DemoError(f"report: {e}") from None

    chance = 100.0 / args.classes
    kwargs = "".join(f", {k}={v!r}" for k, v in cfg.model.kwargs.items())
    min_top1 = 3 * chance if args.min_top1 is None else args.min_top1
    spe = info["steps_per_epoch"]
    into = info["stop_step"] - info["stop_epoch"] * spe
    print(f"""
==================================== demo summary ====================================
format: {args.format}; {args.nproc} processes; {info['final_step']} optimizer steps ({spe} per epoch)
interrupted by SIGTERM at step {info['stop_step']} ({into} of {spe} steps into epoch {info['stop_epoch']}), \
resumed from its checkpoint, finished
top-1 / top-5 on {results['model']['count']} validation images (chance: {chance:.0f}%):
  model  {results['model']['top1']:6.2f} / {results['model']['top5']:6.2f}
  EMA    {results['EMA']['top1']:6.2f} / {results['EMA']['top5']:6.2f}
time: {time.time() - t0:.0f} s in all, {t_train:.0f} s training (two starts)

run dir      {run_dir}
metrics      {run_dir / 'metrics.jsonl'}   (TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})
checkpoints  {run_dir / 'checkpoints'}   (latest: {(run_dir / 'checkpoints' / 'latest').read_text().strip()})
plots        {report['summary'].parent}/{{loss,lr,accuracy,throughput}}.png
summary      {report['summary']}
weights      {exported['model']}
             {exported['EMA']}

next:
  {'make demo FORMAT=' + ('wds' if args.format == 'ffcv' else 'ffcv'):<35}# the other loader
  make test                          # the test suite
  python -m pipeline eval --checkpoint {run_dir} --ema
  python -c "import timm, pipeline.models, safetensors.torch as st; \\
    m = timm.create_model('{cfg.model.name}', num_classes={args.classes}{kwargs}); \\
    m.load_state_dict(st.load_file('{exported['EMA']}'))"
  make shards SRC=/data/imagenet     # the real thing (README: the walkthrough), then
  SHARDS=shards/imagenet1k sbatch launch/rmt_l_64gpu.sh
=======================================================================================""", flush=True)
    low = [f"{name} top-1 {res['top1']:.1f}%" for name, res in results.items() if res["top1"] < min_top1]
    if low:
        raise DemoError(f"{' and '.join(low)} below {min_top1:.1f}%: the demo did not learn; see "
                        f"{report['summary']}")
    return 0
