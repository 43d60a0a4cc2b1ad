"""`make bench`: every CPU benchmark in one run, one table of numbers and ratios, JSON for comparisons.

Runs bench/bench_model.py, bench_data.py, bench_shards.py and bench_engine.py (those present), each in
its own process from the repository root, with small inputs unless --full (each script's own defaults,
as `make bench-<x>` runs them). Each hands over its results as JSON (a `--json PATH` file, or one JSON
line it prints: bench_engine); their full tables stay in their own BENCHMARKS.md sections, written by
`make bench-<x>`, not here. Writes bench/results.json (machine, command, every benchmark's JSON, the
summary rows) and the "## Summary (make bench)" section of BENCHMARKS.md (or --markdown).

    python bench/run_all.py [--full] [--only model data ...] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.sections import write_section  # noqa: E402

SECTION = "## Summary (make bench)"

# name -> (module, its small options, how it hands over its results: "--json" = a `--json PATH` flag,
# "--markdown" = a BENCHMARKS.md section flag set to '' (none written); no "--json": it prints them as
# one JSON object line)
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "model": ("bench.bench_model", ["--models", "rmt_t", "--size", "128", "--batch", "4", "--steps", "2"],
              ["--json"]),
    "data": ("bench.bench_data", ["--classes", "4", "--train-per-class", "16", "--val-per-class", "8",
                                  "--batch", "16", "--workers", "0", "1", "--repeat", "1"],
             ["--json", "--markdown"]),
    # its defaults are small already (450 images); fewer would measure start-up, not throughput
    "shards": ("bench.bench_shards", [], ["--json", "--markdown"]),
    "engine": ("bench.bench_engine", ["--steps", "5"], []),
}


def _row(bench: str, what: str, value: float | None, unit: str, ratio: float | None, vs: str,
         ratio_unit: str = "x") -> dict:
    """One summary row; `ratio` is a factor shown as "1.23x", or with ratio_unit "%" a fraction."""
    return {"bench": bench, "what": what, "value": value, "unit": unit, "ratio": ratio,
            "ratio_unit": ratio_unit, "vs": vs}


def summarize(name: str, data: dict) -> list[dict]:
    """The rows of the summary table for one benchmark's JSON results."""
    if name == "model":
        out = []
        for r in data["rows"]:
            if r["impl"] != "ours":
                continue
            what = (f"{r['model']} {r['precision']} train step, {data['size']} px, batch "
                    f"{data['batch']}{', act. checkpointing' if r['checkpointing'] else ''}")
            out.append(_row(name, what, r["images_per_s"], "images/s", r["speedup_vs_reference"],
                            "speed vs the straightforward MaSA"))
            out.append(_row(name, what + ": peak memory", r["peak_gib"], "GiB", r["memory_vs_reference"],
                            "memory vs the straightforward MaSA"))
        return out
    if name == "engine" and "train_step_ms" in data:
        setting = f"{data['model']}, {data['img']} px, batch {data['batch']}, 1 process, ZeRO-2"
        step, frac, of_step = data["train_step_ms"], data["per_step_overhead_frac"], "of a training step"
        return [
            _row(name, f"training step ({setting})", step, "ms", None, ""),
            _row(name, "trainer's own per-step work (EMA, stop/non-finite all_reduce, reseed, metrics)",
                 step * frac, "ms", frac, of_step, "%"),
            _row(name, "EMA update", data["ema_update_ms"], "ms", data["ema_update_ms"] / step, of_step, "%"),
            _row(name, f"checkpoint save ({data['checkpoint_gb']:.2f} GB)", data["save_s_per_gb"], "s/GB",
                 None, ""),
            _row(name, "checkpoint load", data["load_s_per_gb"], "s/GB", None, ""),
        ]
    if name == "data":
        out = []
        for r in data["rows"]:
            if r["pipeline"] == "baseline":
                continue
            ra = f", RandAugment {r['rand_augment']}" if r["rand_augment"] else ""
            what = f"{r['split']} loader {r['pipeline']}{ra}, {r['workers']} worker(s)"
            if r["pipeline"].endswith("-device"):  # data.decode=device: the CPU side only
                out.append(_row(name, what + ", CPU side", r["images_per_s_per_core"], "images/s per core",
                                r["per_core_vs_cpu_path"], "per core vs the same format's CPU decode path"))
            else:
                out.append(_row(name, what, r["images_per_s_per_core"], "images/s per core",
                                r["per_core_vs_baseline"], "per core vs ImageFolder + timm"))
        if any(r["pipeline"].endswith("-device") for r in data["rows"]):
            out.append(_row(name, "data.decode=device: decode + augment of a batch on the GPU", None,
                            "ms per batch", None, "unmeasured (no GPU)"))
        return out
    if name == "shards":
        return [_row(name, f"{r['run']}, {r['workers']} worker(s)", r["images_per_s"], "images/s",
                     r["vs_check"], f"{data['baseline']} in 1 process") for r in data["rows"]]
    return []


def _printed_json(stdout: str) -> dict | None:
    """The last line of `stdout` that is one JSON object (how bench_engine hands over its results)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_bench(name: str, module: str, small: list[str], outputs: list[str], full: bool, tmp: Path) -> dict:
    script = REPO / (module.replace(".", "/") + ".py")
    if not script.is_file():
        return {"status": "absent", "script": str(script.relative_to(REPO))}
    out_json = tmp / f"{name}.json"
    args = ([] if full else small) + (["--json", str(out_json)] if "--json" in outputs else []) + (
        ["--markdown", ""] if "--markdown" in outputs else [])
    print(f"\n[bench] {name}: python -m {module} {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    sys.stdout.write(proc.stdout)
    result = {"status": "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
              "script": str(script.relative_to(REPO)), "args": args, "seconds": round(seconds, 1)}
    if proc.returncode != 0:
        result["output_tail"] = proc.stdout[-3000:]
        return result
    data = json.loads(out_json.read_text()) if out_json.is_file() else _printed_json(proc.stdout)
    if data is None:
        result["status"] = "no JSON results in its output"
    else:
        result["json"] = data
    return result


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "load_average": round(os.getloadavg()[0], 1)}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [SECTION, "",
             f"`{results['command']}` ({results['date']}, {'full' if results['full'] else 'small'} inputs): "
             f"{m['cpus']} CPUs ({m['cpu']}), torch {m['torch']}, Python {m['python']}; load average "
             f"{m['load_average']} at the end (the machine is shared: compare ratios, which are measured "
             "side by side in one run, more than absolute numbers). Each benchmark's own section below "
             f"holds its full table (`make bench-<name>`); JSON: {results['json']}.", "",
             "| benchmark | what | number | unit | ratio | ratio of |", "|---|---|---|---|---|---|"]
    for name, res in results["benchmarks"].items():
        if res["status"] != "ok":
            lines.append(f"| {name} | {res['script']}: {res['status']} | - | - | - | - |")
            continue
        rows = [r for r in results["summary"] if r["bench"] == name]
        if not rows:
            lines.append(f"| {name} | {res['script']}: no summary rows in its results | - | - | - | - |")
        for r in rows:
            if r["ratio"] is None:
                ratio = "-"
            elif r["ratio_unit"] == "%":
                ratio = f"{100 * r['ratio']:.2g}%"
            else:
                ratio = f"{r['ratio']:.2f}x"
            lines.append(f"| {name} | {r['what']} | {_fmt(r['value'])} | {r['unit']} | {ratio} | {r['vs']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="each benchmark's own default sizes (slow)")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these benchmarks")
    ap.add_argument("--json", default=str(REPO / "bench" / "results.json"), help="default: %(default)s")
    ap.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"), help="default: %(default)s")
    args = ap.parse_args(argv)

    command = "make bench" + (" BENCH_ARGS=" + shlex.quote(shlex.join(argv or sys.argv[1:]))
                              if (argv or sys.argv[1:]) else "")
    json_path = Path(args.json).resolve()
    shown = json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path
    results = {"command": command, "json": str(shown),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "full": args.full,
               "benchmarks": {}, "summary": []}
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for name, (module, small, outputs) in BENCHES.items():
            if args.only and name not in args.only:
                continue
            res = run_bench(name, module, small, outputs, args.full, Path(tmp))
            results["benchmarks"][name] = res
            if res["status"] == "ok":
                results["summary"] += summarize(name, res["json"])
    results["machine"] = machine()
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    write_section(Path(args.markdown), text, first=True)
    print("\n" + text)
    print(f"[bench] wrote {args.json} and the '{SECTION[3:]}' section of {args.markdown}")
    failed = [n for n, r in results["benchmarks"].items() if r["status"] not in ("ok", "absent")]
    if failed:
        print(f"[bench] FAILED: {', '.join(failed)} (output tails in {args.json})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
