"""The `report` command: PNG plots and a markdown summary of a run directory's metrics.jsonl.

    python -m pipeline report RUN_DIR [--out DIR]

Writes into DIR (default RUN_DIR/report): loss.png (train loss), lr.png, accuracy.png (top-1/top-5
of the model and its EMA per epoch), throughput.png (images/s and data-wait fraction) and
summary.md (config, best and final accuracy, time, throughput). A resumed run appends to
metrics.jsonl; a step logged twice (a crash after the last checkpoint) keeps its last record.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import InputError
from pipeline.train.run_dir import RunDir

PLOTS = ("loss.png", "lr.png", "accuracy.png", "throughput.png")


class ReportError(InputError, ValueError):
    """A run dir or metrics file that cannot be reported on; the message names it and the fix."""


@dataclass
class Metrics:
    """The records of one run, in step order, de-duplicated; `segments` counts starts (1 + resumes)."""

    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    ends: list[dict] = field(default_factory=list)
    segments: list[tuple[float, float]] = field(default_factory=list)  # (first time, last time) per start


def read_metrics(path: Path) -> Metrics:
    if not path.is_file():
        raise ReportError(f"'{path}' not found: pass a run dir written by `python -m pipeline train` "
                          "(it holds metrics.jsonl)")
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # the last line of a run killed mid-write may be cut short; anything else is damage
            if n == len(lines):
                continue
            raise ReportError(f"{path}:{n} is not JSON: repair or delete that line") from None
        if not isinstance(rec, dict) or "kind" not in rec:
            raise ReportError(f"{path}:{n} has no 'kind': not a metrics.jsonl of this pipeline")
        records.append(rec)
    m = Metrics()
    by_step: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    start = None
    last = None
    for rec in records:
        t = rec.get("time")
        if isinstance(t, int | float):
            start = t if start is None else start
            last = t
        kind = rec["kind"]
        if kind in by_step:
            by_step[kind][int(rec["step"])] = rec
        elif kind == "end":
            m.ends.append(rec)
            if start is not None:
                m.segments.append((start, last))
            start = None
    if start is not None:  # still running, or killed without an end line
        m.segments.append((start, last))
    m.train = [by_step["train"][s] for s in sorted(by_step["train"])]
    m.eval = [by_step["eval"][s] for s in sorted(by_step["eval"])]
    if not m.train and not m.eval:
        raise ReportError(f"{path} has no train or eval records yet: wait for the first "
                          "metrics.log_every steps, then run the report again")
    return m


def _num(values) -> list[float]:
    """Floats, with the strings the trainer writes for non-finite values ('nan', 'inf') as floats."""
    return [float(v) for v in values]


def _mark_resumes(m: Metrics, ax) -> None:
    """A dotted vertical line where the run stopped on a signal and was resumed."""
    for i, end in enumerate(e for e in m.ends if e.get("reason") == "signal"):
        ax.axvline(end["step"], color="grey", linestyle=":", label="stopped + resumed" if i == 0 else None)


def _plot_loss(m: Metrics, out: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(9.5, 4))
    steps = [r["step"] for r in m.train]
    ax.plot(steps, _num(r["loss"] for r in m.train), label="train loss (mean over log window)")
    _mark_resumes(m, ax)
    if m.eval:
        ax.plot([r["step"] for r in m.eval], _num(r["loss"] for r in m.eval), "o-",
                label="val loss (model)")
        if "ema_loss" in m.eval[0]:
            ax.plot([r["step"] for r in m.eval], _num(r["ema_loss"] for r in m.eval), "s--",
                    label="val loss (EMA)")
    _finish(fig, ax, out / "loss.png", plt, "optimizer step", "cross-entropy loss", "Loss", legend=True)


def _plot_lr(m: Metrics, out: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in m.train], _num(r["lr"] for r in m.train))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    _finish(fig, ax, out / "lr.png", plt, "optimizer step", "learning rate",
            "Learning rate (warmup + cosine)")


def _plot_accuracy(m: Metrics, out: Path, plt, num_classes: int | None) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8.5, 4))
    if num_classes:
        chance = 100 / num_classes
        ax.axhline(chance, color="grey", linestyle="--", label=f"chance ({chance:.3g}%)")
    if m.eval:
        epochs = [r["epoch"] for r in m.eval]
        ax.plot(epochs, _num(r["top1"] for r in m.eval), "o-", color="C0", label="model top-1")
        ax.plot(epochs, _num(r["top5"] for r in m.eval), "o:", color="C0", label="model top-5")
        if "ema_top1" in m.eval[0]:
            ax.plot(epochs, _num(r["ema_top1"] for r in m.eval), "s-", color="C1", label="EMA top-1")
            ax.plot(epochs, _num(r["ema_top5"] for r in m.eval), "s:", color="C1", label="EMA top-5")
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(fig, ax, out / "accuracy.png", plt, "epoch", "validation accuracy (%)", "Validation accuracy",
            legend=True)


def _plot_throughput(m: Metrics, out: Path, plt) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    steps = [r["step"] for r in m.train]
    top.plot(steps, _num(r["images_per_s"] for r in m.train), label="all devices")
    top.plot(steps, _num(r["images_per_s_per_device"] for r in m.train), label="per device")
    top.set_ylabel("training images/s")
    top.set_title("Throughput and time waiting for data")
    top.set_ylim(bottom=0)
    _mark_resumes(m, top)
    top.grid(alpha=0.3)
    top.legend()
    bottom.plot(steps, [100 * v for v in _num(r["data_wait_frac"] for r in m.train)], color="C2")
    bottom.set_ylabel("waiting for data (% of step time)")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylim(0, 100)
    bottom.grid(alpha=0.3)
    _save(fig, out / "throughput.png", plt)


def _finish(fig, ax, path: Path, plt, xlabel: str, ylabel: str, title: str, legend: bool = False) -> None:
    """Label and grid one-axes figure `fig` (its legend outside, at the right), then save it to `path`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path, plt)


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(m: Metrics, out: Path, num_classes: int | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    _plot_loss(m, out, plt)
    _plot_lr(m, out, plt)
    _plot_accuracy(m, out, plt, num_classes)
    _plot_throughput(m, out, plt)
    return [out / name for name in PLOTS]


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    mins, s = divmod(rest, 60)
    return f"{h}h {mins:02d}m {s:02d}s" if h else f"{mins}m {s:02d}s"


def _best(m: Metrics, key: str) -> dict | None:
    rows = [r for r in m.eval if key in r and not math.isnan(float(r[key]))]
    return max(rows, key=lambda r: float(r[key])) if rows else None


def paper_number(evals: list[dict]) -> dict | None:
    """The paper's top-1: the best over all evaluations of max(model, EMA), with its epoch and weights."""
    best = None
    for r in evals:
        for weights, key in (("model", "top1"), ("EMA", "ema_top1")):
            if key in r and not math.isnan(float(r[key])) and (best is None or float(r[key]) > best["top1"]):
                best = {"top1": float(r[key]), "epoch": r["epoch"], "weights": weights}
    return best


def summary(m: Metrics, cfg: dict | None, run_dir: Path) -> str:
    lines = [f"# Run report: `{run_dir}`", ""]
    if cfg:
        model, data, train = cfg.get("model", {}), cfg.get("data", {}), cfg.get("train", {})
        ds = cfg.get("deepspeed", {})
        lines += ["## Config", "",
                  f"- model: {model.get('name')} ({model.get('num_classes')} classes, drop path "
                  f"{model.get('drop_path') if model.get('drop_path') is not None else 'of the variant'})",
                  f"- data: {data.get('root')} ({data.get('format')}), train {data.get('img_size')} px, "
                  f"eval {data.get('eval_img_size')} px",
                  f"- global batch {train.get('global_batch')} (at most {train.get('max_batch_per_device')} "
                  f"per device), schedule {cfg.get('optim', {}).get('schedule')}, "
                  f"{train.get('epochs')} epochs, {train.get('precision')}, ZeRO-{ds.get('zero_stage')}, "
                  f"lr {cfg.get('optim', {}).get('lr')} at batch {cfg.get('optim', {}).get('lr_base_batch')}",
                  ""]
    lines += ["## Accuracy (validation, %)", ""]
    if m.eval:
        final = m.eval[-1]
        lines += ["| weights | final top-1 | final top-5 | best top-1 (epoch) |", "|---|---|---|---|"]
        for name, prefix in (("model", ""), ("EMA", "ema_")):
            if f"{prefix}top1" not in final:
                continue
            best = _best(m, f"{prefix}top1")
            top1, top5 = float(final[prefix + "top1"]), float(final[prefix + "top5"])
            lines.append(f"| {name} | {top1:.2f} | {top5:.2f} | {float(best[prefix + 'top1']):.2f} "
                         f"({best['epoch']}) |")
        paper = paper_number(m.eval)
        if paper is not None:
            lines += ["", f"**Paper's number** (best over epochs of max(model, EMA), as RMT reports top-1): "
                          f"{paper['top1']:.2f} ({paper['weights']}, epoch {paper['epoch']})."]
        lines += ["", f"Final evaluation after epoch {final['epoch']} (step {final['step']})."]
    else:
        lines.append("No evaluation yet.")
    lines += ["", "## Time", ""]
    last_step = max([r["step"] for r in m.train + m.eval])
    wall = m.segments[-1][1] - m.segments[0][0] if m.segments else 0.0
    active = sum(b - a for a, b in m.segments)
    reason = m.ends[-1]["reason"] if m.ends else "running (or killed: no end record)"
    lines += [f"- {last_step} optimizer steps; state: {reason}",
              f"- starts: {len(m.segments)} ({len(m.segments) - 1} resumes); "
              f"stopped on a signal: {sum(e.get('reason') == 'signal' for e in m.ends)} times",
              f"- first to last record: {_fmt_duration(wall)}; while running: {_fmt_duration(active)} "
              "(from each start's first record to its last)"]
    if m.train:
        ips = _num(r["images_per_s"] for r in m.train)
        per_dev = _num(r["images_per_s_per_device"] for r in m.train)
        wait = _num(r["data_wait_frac"] for r in m.train)
        step_time = _num(r["step_time_s"] for r in m.train)
        devices = round(ips[-1] / per_dev[-1]) if per_dev[-1] else "?"
        lines += ["", "## Throughput (median over log windows)", "",
                  f"- {statistics.median(ips):.1f} images/s on {devices} devices "
                  f"({statistics.median(per_dev):.1f} per device); {statistics.median(step_time):.3f} s "
                  "per optimizer step",
                  f"- waiting for data: {100 * statistics.median(wait):.1f}% of step time "
                  f"(max {100 * max(wait):.1f}%)",
                  f"- MFU {100 * statistics.median(_num(r['mfu'] for r in m.train)):.3g}%; peak memory "
                  f"{max(_num(r['max_mem_gb'] for r in m.train)):.2f} GB per process",
                  f"- final train loss {float(m.train[-1]['loss']):.4f}, lr {float(m.train[-1]['lr']):.3g}"]
    lines += ["", "## Plots", "", *[f"![{name[:-4]}]({name})" for name in PLOTS], "",
              f"_Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
              "`python -m pipeline report`._",
              ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Plots and summary.md of `run_dir`; returns {"plots": [...], "summary": path, "metrics": Metrics}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run dir '{run_dir}' does not exist: pass the output_dir of a training run")
    layout = RunDir(run_dir)
    m = read_metrics(layout.metrics)
    cfg = None
    if layout.config.is_file():
        cfg = yaml.safe_load(layout.config.read_text())
    out = Path(out) if out else layout.report
    plots = plot(m, out, (cfg or {}).get("model", {}).get("num_classes"))
    (out / "summary.md").write_text(summary(m, cfg, run_dir))
    return {"plots": plots, "summary": out / "summary.md", "metrics": m}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/report)")


def run(args: argparse.Namespace) -> int:
    res = write_report(args.run_dir, args.out)
    print(f"report: {res['summary']}")
    for p in res["plots"]:
        print(f"  {p}")
    return 0
