"""The `demo` command (`make demo`, `make demo TL=1`): every part of the pipeline end to end on a CPU.

    python -m pipeline demo [--format wds|ffcv] [--token-label] [dotted.key=value ...]

fake ImageNet -> shards (WebDataset and FFCV) -> RMT-T trained by 2 CPU processes under DeepSpeed,
started through launch/local.sh as users start it -> SIGTERM in the middle of an epoch (checkpoint,
exit 75) -> the same command again resumes and finishes -> eval of the model and its EMA -> export
-> report (plots, summary.md) -> a summary with the paths and the next commands to try.

--token-label (`make demo TL=1`): the plain demo's finished run (runs/demo-FORMAT; the plain demo runs
first when there is none) is the teacher: its EMA weights write a label map per train image of the
same fake ImageNet (`label-maps`), `shards --labels` stores them with the images, and a token-labeling
RMT-T (aux head, MixToken; configs/demo_tl.yaml) trains on them with `train.loss: token_label`, whose
class target comes from the maps too (TokenLabeling's loss ignores the ground-truth label), so a
teacher that learned nothing would teach nothing. Then the same interruption, resume, eval, export,
report and summary.

Each step prints the command a user would type for it. Every demo starts fresh: it deletes what a
previous demo wrote in its own folders (never the teacher run nor the fake ImageNet it reuses).
Exit codes (pipeline.errors): 2 for bad options, 1 when a step fails or the model did not learn.
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

from pipeline.errors import EXIT_REQUEUE, InputError, PipelineError
from pipeline.train.run_dir import CONFIG_FILE, RunDir

REPO = Path(__file__).resolve().parents[1]
MAPS_MARKER = "demo-teacher.txt"  # written into the label-map folder: the demo made it (and from which run)


class DemoError(PipelineError, RuntimeError):
    """A demo step failed, or the model did not learn: a real failure (exit 1). The message names the
    step and where its output is. Bad options are `InputError`s (exit 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="wds", choices=("wds", "ffcv"),
                        help="loader: WebDataset shards or FFCV .beton files (default: %(default)s)")
    parser.add_argument("--token-label", action="store_true",
                        help="token labeling: the plain demo's run teaches, through label maps in the "
                             "shards, a token-labeling RMT-T (make demo TL=1)")
    parser.add_argument("--config", help="training recipe (default: configs/demo.yaml; --token-label: "
                                         "configs/demo_tl.yaml)")
    parser.add_argument("--data", default="data/demo",
                        help="fake ImageNet folder; --token-label: the teacher's (default: %(default)s)")
    parser.add_argument("--shards", help="shards folder, recreated (default: shards/demo; --token-label: "
                                         "shards/demo-tl)")
    parser.add_argument("--run-dir", help="run dir, recreated (default: runs/demo-FORMAT; --token-label: "
                                          "runs/demo-tl-FORMAT)")
    parser.add_argument("--teacher", help="--token-label: the teacher, a finished plain demo run, made by "
                                          "the plain demo when missing (default: runs/demo-FORMAT)")
    parser.add_argument("--maps", default="data/demo-tl-maps",
                        help="--token-label: label-map folder, recreated (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=10, help="fake classes (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=40, help="default: %(default)s")
    parser.add_argument("--val-per-class", type=int, default=10, help="default: %(default)s")
    parser.add_argument("--max-side", type=int, default=160,
                        help="largest usual side of the fake images in px (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (default: %(default)s)")
    parser.add_argument("--min-top1", type=float,
                        help="fail unless model and EMA top-1 (%%) reach this (default: 3x chance)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted.key=value training overrides, e.g. train.epochs=4 (--token-label: for "
                             "the token-labeling run, not its teacher)")


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on --format and --token-label."""
    tl = "-tl" if args.token_label else ""
    args.config = args.config or str(REPO / "configs" / f"demo{tl.replace('-', '_')}.yaml")
    args.shards = args.shards or f"shards/demo{tl}"
    args.run_dir = args.run_dir or f"runs/demo{tl}-{args.format}"
    args.teacher = args.teacher or f"runs/demo-{args.format}"
    return args


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
        raise InputError(f"{option} {path} exists and was not written by the demo (no {marker}): pass "
                         f"another {option}")
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

    cfg = load_config(args.config, train_overrides(args))
    if cfg.train.epochs < 2 or cfg.train.eval_every_epochs != 1 or cfg.train.max_steps:
        raise ConfigError("the demo stops training in the middle of an epoch after the first evaluation: it "
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


class Steps:
    """Prints "[demo] i/N what" headings."""

    def __init__(self, total: int):
        self.done, self.total = 0, total

    def __call__(self, text: str) -> None:
        self.done += 1
        _say(f"{self.done}/{self.total} {text}")


def run(args: argparse.Namespace) -> int:
    args = settle(args)
    t0 = time.time()
    data, shards, run_dir = (Path(p).resolve() for p in (args.data, args.shards, args.run_dir))
    cfg = check_config(args)
    if args.token_label:
        return token_label_demo(args, cfg, data, shards, run_dir, t0)
    for path, marker, option in ((data, "folders", "--data"), (shards, "manifest.json", "--shards"),
                                 (run_dir, CONFIG_FILE, "--run-dir")):
        _fresh(path, marker, option)
    step = Steps(6)
    step(f"fake ImageNet: {args.classes} learnable classes (shape, colour, texture) in ImageNet's layout")
    _check(_python("fake-imagenet", "--out", str(data), "--layouts", "folders",
                   "--classes", str(args.classes), "--train-per-class", str(args.train_per_class),
                   "--val-per-class", str(args.val_per_class),
                   "--min-side", str(min(64, args.max_side)), "--max-side", str(args.max_side)),
           "fake-imagenet")
    step("shards in both formats (what `make shards SRC=... OUT=...` runs)")
    _check(_python("shards", "--src", str(data / "folders"), "--out", str(shards), "--formats", "wds", "ffcv",
                   "--classes", str(args.classes), "--workers", "1", "--no-progress"), "shards")
    other = "wds" if args.format == "ffcv" else "ffcv"
    return train_to_summary(args, cfg, run_dir, shards, step, t0, "RMT-T", [], [
        f"{'make demo FORMAT=' + other:<35}# the other loader",
        f"{token_label_next(args, data, run_dir):<35}# token labeling, this run as the teacher",
        "make test                          # the test suite",
        f"python -m pipeline eval --checkpoint {run_dir} --ema",
        *_load_line(cfg, args.classes, run_dir),
        "make shards SRC=/data/imagenet     # the real thing (README: the walkthrough), then",
        "SHARDS=shards/imagenet1k sbatch launch/rmt_l_64gpu.sh"])


def token_label_next(args: argparse.Namespace, data: Path, run_dir: Path) -> str:
    """The command that runs the token-labeling demo with this plain run as its teacher."""
    defaults = (Path(f"runs/demo-{args.format}").resolve(), Path("data/demo").resolve(), 10)
    if (run_dir, data, args.classes) == defaults:
        return f"make demo TL=1 FORMAT={args.format}"
    return (f"python -m pipeline demo --token-label --format {args.format} --teacher {run_dir} --data {data} "
            f"--classes {args.classes}")


def _load_line(cfg, classes: int, run_dir: Path) -> list[str]:
    kwargs = "".join(f", {k}={v!r}" for k, v in cfg.model.kwargs.items())
    return ['python -c "import timm, pipeline.models, safetensors.torch as st; \\',
            f"  m = timm.create_model('{cfg.model.name}', num_classes={classes}{kwargs}); \\",
            f"  m.load_state_dict(st.load_file('{exported(cfg, run_dir, ema=True)}'))\""]


def exported(cfg, run_dir: Path, ema: bool) -> Path:
    return RunDir(run_dir).export / f"{cfg.model.name}_demo{'_ema' if ema else ''}.safetensors"


def train_to_summary(args: argparse.Namespace, cfg, run_dir: Path, shards: Path, step: Steps, t0: float,
                     model: str, about: list[str], next_lines: list[str]) -> int:
    """Train (interrupted, resumed), eval, export, report, print the summary (`about`: lines on what
    this demo fed the training; `next_lines`: commands to try next); DemoError unless it learned."""
    from pipeline.report import ReportError, write_report

    step(f"training {model} with {args.nproc} CPU processes under DeepSpeed ({args.format} loader), "
         "interrupted mid-epoch, then resumed")
    t_train = time.time()
    info = train_with_interruption(Launch(args, run_dir, shards), run_dir, cfg.train.epochs)
    t_train = time.time() - t_train

    step("evaluating the final checkpoint: model and EMA weights")
    results = {}
    for name, extra in (("model", []), ("EMA", ["--ema"])):
        proc = _python("eval", "--checkpoint", str(run_dir), *extra, capture=True)
        _check(proc, f"eval of the {name}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(proc.stdout.strip().splitlines()[-1], flush=True)

    step("exporting consolidated fp32 weights (safetensors, loadable with timm.create_model)")
    for name, ema in (("model", False), ("EMA", True)):
        _check(_python("export", str(run_dir), "--out", str(exported(cfg, run_dir, ema)),
                       *(["--ema"] if ema else [])), f"export of the {name}")

    step("report: plots and summary")
    print(f"$ python -m pipeline report {run_dir}", flush=True)
    try:
        report = write_report(run_dir)
    except ReportError as e:
        raise DemoError(f"report: {e}") from None

    rd = RunDir(run_dir)
    chance = 100.0 / args.classes
    spe = info["steps_per_epoch"]
    into = info["stop_step"] - info["stop_epoch"] * spe
    lines = [
        f"format: {args.format}; {args.nproc} processes; {info['final_step']} optimizer steps "
        f"({spe} per epoch)",
        f"interrupted by SIGTERM at step {info['stop_step']} ({into} of {spe} steps into epoch "
        f"{info['stop_epoch']}), resumed from its checkpoint, finished",
        *about,
        f"top-1 / top-5 on {results['model']['count']} validation images (chance: {chance:.0f}%):",
        *(f"  {name:<6} {res['top1']:6.2f} / {res['top5']:6.2f}" for name, res in results.items()),
        f"time: {time.time() - t0:.0f} s in all, {t_train:.0f} s training (two starts)",
        "",
        f"run dir      {run_dir}",
        f"metrics      {rd.metrics}   (TensorBoard: tensorboard --logdir {rd.tensorboard})",
        f"checkpoints  {rd.checkpoints}   (latest: {rd.resume_point().name})",
        f"plots        {report['summary'].parent}/{{loss,lr,accuracy,throughput}}.png",
        f"summary      {report['summary']}",
        f"weights      {exported(cfg, run_dir, ema=False)}",
        f"             {exported(cfg, run_dir, ema=True)}",
        "",
        "next:",
        *(f"  {line}" for line in next_lines),
    ]
    print(f"\n{' demo summary ':=^86}\n" + "\n".join(lines) + "\n" + "=" * 86, flush=True)
    check_learned(results, 3 * chance if args.min_top1 is None else args.min_top1, report["summary"])
    return 0


def check_learned(results: dict, min_top1: float, summary: Path) -> None:
    """DemoError unless every result ({"model": eval record, "EMA": ...}) reached `min_top1`."""
    low = [f"{name} top-1 {res['top1']:.1f}%" for name, res in results.items() if res["top1"] < min_top1]
    if low:
        raise DemoError(f"{' and '.join(low)} below {min_top1:.1f}%: the demo did not learn; see {summary}")


# ---------------------------------------------------------------- token labeling (--token-label)

def teacher_missing(teacher: Path, data: Path, classes: int) -> str | None:
    """Why `teacher` cannot teach this demo (then the plain demo runs first), or None: a finished run
    for `classes` classes whose fake ImageNet (`data`) is still there."""
    from pipeline.train.config import load_config

    ends = [r for r in _records(teacher) if r["kind"] == "end"]
    if not ends or ends[-1]["reason"] != "finished":
        return f"no finished plain demo run in {teacher}"
    trained = load_config(RunDir(teacher).config).model.num_classes
    if trained != classes:
        return f"the run in {teacher} was trained on {trained} classes, not --classes {classes}"
    if not (data / "folders").is_dir():
        return f"its fake ImageNet {data / 'folders'} is gone"
    return None


def plain_demo_args(args: argparse.Namespace, data: Path, teacher: Path) -> list[str]:
    """`demo` options of the plain demo that makes the teacher: the same data, classes and processes."""
    return ["demo", "--format", args.format, "--data", str(data), "--run-dir", str(teacher),
            "--classes", str(args.classes), "--train-per-class", str(args.train_per_class),
            "--val-per-class", str(args.val_per_class), "--max-side", str(args.max_side),
            "--nproc", str(args.nproc)]


def token_label_demo(args: argparse.Namespace, cfg, data: Path, shards: Path, run_dir: Path,
                     t0: float) -> int:
    from pipeline.data import label_maps
    from pipeline.train.config import load_config

    teacher, maps = Path(args.teacher).resolve(), Path(args.maps).resolve()
    if teacher == run_dir:
        raise InputError(f"--teacher {teacher} and --run-dir {run_dir} must be different folders")
    for path, marker, option in ((maps, MAPS_MARKER, "--maps"), (shards, "manifest.json", "--shards"),
                                 (run_dir, CONFIG_FILE, "--run-dir")):
        _fresh(path, marker, option)
    step = Steps(7)
    step(f"teacher: the plain demo's run {teacher}")
    why = teacher_missing(teacher, data, args.classes)
    if why is not None:
        print(f"[demo] {why}: running the plain demo first", flush=True)
        _check(_python(*plain_demo_args(args, data, teacher)), "the plain demo (the teacher)")
        why = teacher_missing(teacher, data, args.classes)
        if why is not None:
            raise DemoError(f"the plain demo finished, but {why}")
    teacher_cfg = load_config(RunDir(teacher).config)
    last = [r for r in _records(teacher) if r["kind"] == "eval"][-1]
    print(f"[demo] teacher: {teacher_cfg.model.name} from {teacher}, EMA top-1 {last['ema_top1']:.2f}% "
          f"(model {last['top1']:.2f}%) on the validation images", flush=True)

    # the teacher at its own evaluation size (TokenLabeling: NFNet-F6 at 576, its test size); the demo's
    # small teacher loses accuracy at twice it (measured: 43% -> 33% top-1 of its maps on 10 classes)
    size = teacher_cfg.data.eval_img_size
    step(f"label maps: the teacher's EMA weights at {size} px, top-5 classes at every final-stage position "
         "of each train image (what you run for ImageNet with your own teacher)")
    maps.mkdir(parents=True, exist_ok=True)
    (maps / MAPS_MARKER).write_text(f"{teacher}\n")
    _check(_python("label-maps", "--teacher", str(teacher), "--ema", "--src", str(data / "folders"),
                   "--out", str(maps), "--classes", str(args.classes), "--img-size", str(size),
                   "--top-k", str(min(label_maps.TOP_K, args.classes)), "--device", "cpu", "--no-progress"),
           "label-maps")

    step("shards with the label maps, both formats (what `make shards SRC=... LABELS=...` runs)")
    _check(_python("shards", "--src", str(data / "folders"), "--out", str(shards), "--formats", "wds", "ffcv",
                   "--classes", str(args.classes), "--labels", str(maps), "--workers", "1", "--no-progress"),
           "shards --labels")
    count = sum(1 for _ in maps.rglob("*.pt"))
    scores, _ = label_maps.read_pt(maps, next(maps.rglob("*.pt")).stem, args.classes)
    about = [f"teacher {teacher} (EMA top-1 {last['ema_top1']:.2f}%) -> {count} label maps "
             f"[2, {', '.join(map(str, scores.shape))}] in {maps}",
             "class and dense targets from the maps (train.loss: token_label), MixToken in the model"]
    return train_to_summary(args, cfg, run_dir, shards, step, t0, "a token-labeling RMT-T", about, [
        f"{'make demo TL=1 FORMAT=' + ('wds' if args.format == 'ffcv' else 'ffcv'):<35}# the other loader",
        f"python -m pipeline eval --checkpoint {run_dir} --ema",
        *_load_line(cfg, args.classes, run_dir),
        "make shards SRC=/data/imagenet OUT=shards/imagenet1k-tl LABELS=/data/label_top5_train_nfnet",
        "CONFIG=configs/rmt_l_tl.yaml RUN_DIR=runs/rmt_l_tl SHARDS=shards/imagenet1k-tl sbatch "
        "launch/rmt_l_64gpu.sh   # README: Token labeling"])
