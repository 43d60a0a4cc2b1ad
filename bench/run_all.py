"""`make bench`: every CPU benchmark in one run, one table of numbers and ratios, JSON for comparisons.

Runs bench/bench_model.py, bench_data.py, bench_shards.py and bench_engine.py (those present), each in
its own process from the repository root, with small inputs unless --full (each script's own defaults,
as `make bench-<x>` runs them). Their full tables stay in their own BENCHMARKS.md sections, written by
`make bench-<x>`: here they write to a temporary file, which is parsed. Writes bench/results.json
(machine, command, every parsed result, the summary rows) and the "## Summary (make bench)" section of
BENCHMARKS.md (or --markdown).

    python bench/run_all.py [--full] [--only model data ...] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Summary (make bench)"

# name -> (module, small options: each passed only when the script's --help lists the flag)
BENCHES: dict[str, tuple[str, list[list[str]]]] = {
    "model": ("bench.bench_model", [["--models", "rmt_t"], ["--size", "128"], ["--batch", "4"],
                                    ["--steps", "2"]]),
    "data": ("bench.bench_data", [["--classes", "4"], ["--train-per-class", "16"], ["--val-per-class", "8"],
                                  ["--batch", "16"], ["--workers", "1"], ["--repeat", "1"]]),
    # its defaults are small already (450 images); fewer would measure start-up, not throughput
    "shards": ("bench.bench_shards", []),
    "engine": ("bench.bench_engine", [["--steps", "5"]]),
}


def parse_tables(markdown: str) -> list[list[dict]]:
    """Every markdown table in `markdown` as a list of {header: cell} rows."""
    tables, header, rows = [], None, []
    for line in [*markdown.splitlines(), ""]:
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line[1:-1].split("|")]
            if header is None:
                header = cells
            elif not all(set(c) <= set("-: ") for c in cells):
                rows.append(dict(zip(header, cells, strict=False)))
            continue
        if header is not None:
            tables.append(rows)
        header, rows = None, []
    return tables


def _float(text: str) -> float | None:
    m = re.fullmatch(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text.strip().rstrip("x%"))
    return float(m.group(0)) if m else None


def _row(bench: str, what: str, value: float | None, unit: str, ratio: float | None, vs: str,
         ratio_unit: str = "x") -> dict:
    """One summary row; `ratio` is a factor shown as "1.23x", or with ratio_unit "%" a fraction."""
    return {"bench": bench, "what": what, "value": value, "unit": unit, "ratio": ratio,
            "ratio_unit": ratio_unit, "vs": vs}


def _number_unit(text: str) -> tuple[float, str] | None:
    """"331 ms" -> (331.0, "ms"); "1.5" -> (1.5, ""); "1.38%" -> (1.38, "%"); else None."""
    m = re.fullmatch(r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)\s*([^\d\s].*)?", text.strip())
    return (float(m.group(1)), (m.group(2) or "").strip()) if m else None


def summarize(name: str, result: dict) -> list[dict]:
    """The rows of the summary table for one benchmark's parsed result."""
    if "json" in result and name == "model":
        out = []
        for r in result["json"]["rows"]:
            if r["impl"] != "ours":
                continue
            what = (f"{r['model']} {r['precision']} train step, {result['json']['size']} px, batch "
                    f"{result['json']['batch']}{', act. checkpointing' if r['checkpointing'] else ''}")
            out.append(_row(name, what, r["images_per_s"], "images/s", r["speedup_vs_reference"],
                            "speed vs the straightforward MaSA"))
            out.append(_row(name, what + ": peak memory", r["peak_gib"], "GiB", r["memory_vs_reference"],
                            "memory vs the straightforward MaSA"))
        return out
    tables = result.get("tables", [])
    if "json" in result and name == "engine" and "train_step_ms" in result["json"]:
        j = result["json"]
        setting = f"{j['model']}, {j['img']} px, batch {j['batch']}, 1 process, ZeRO-2"
        step, frac, of_step = j["train_step_ms"], j["per_step_overhead_frac"], "of a training step"
        return [
            _row(name, f"training step ({setting})", step, "ms", None, ""),
            _row(name, "trainer's own per-step work (EMA, stop/non-finite all_reduce, reseed, metrics)",
                 step * frac, "ms", frac, of_step, "%"),
            _row(name, "EMA update", j["ema_update_ms"], "ms", j["ema_update_ms"] / step, of_step, "%"),
            _row(name, f"checkpoint save ({j['checkpoint_gb']:.2f} GB)", j["save_s_per_gb"], "s/GB", None,
                 ""),
            _row(name, "checkpoint load", j["load_s_per_gb"], "s/GB", None, ""),
        ]
    if name == "data":
        out = []
        for table in tables:
            for r in table:
                if r.get("pipeline") in ("wds", "ffcv"):
                    ra = f", RandAugment {r['RandAugment']}" if r.get("RandAugment", "-") != "-" else ""
                    what = f"{r['split']} loader {r['pipeline']}{ra}, {r['workers']} worker(s)"
                    out.append(_row(name, what, _float(r["images/s per core"]), "images/s per core",
                                    _float(r["per core vs baseline"]), "per core vs ImageFolder + timm"))
        return out
    if name == "shards":
        out = []
        for table in tables:
            for r in table:
                ratio_key = next((k for k in r if k.startswith("vs.")), None)
                what = f"{r['run']}, {r['workers']} worker(s)"
                out.append(_row(name, what, _float(r["images/s"]), "images/s",
                                _float(r[ratio_key]) if ratio_key else None,
                                ratio_key[4:] if ratio_key else ""))
        return out
    # any other benchmark: per table row, its first rate ("/s" in the header; else its first number,
    # units allowed: "331 ms") and its last ratio ("1.23x"); the other cells name the row
    out = []
    for table in tables:
        for r in table:
            parsed = {k: _number_unit(v) for k, v in r.items()}
            ratios = [k for k in r if parsed[k] and parsed[k][1] == "x"]
            numbers = [k for k in r if parsed[k] and k not in ratios]
            value = next((k for k in numbers if "/s" in k), numbers[0] if numbers else None)
            ratio = ratios[-1] if ratios else None
            labels = [v if parsed[k] is None else f"{k} {v}" for k, v in r.items() if k not in (value, ratio)]
            unit = (f"{value} ({parsed[value][1]})" if parsed[value][1] else value) if value else ""
            out.append(_row(name, ", ".join(labels) or "-", parsed[value][0] if value else None, unit,
                            parsed[ratio][0] if ratio else None, ratio or ""))
    return out


def run_bench(name: str, module: str, options: list[list[str]], full: bool, tmp: Path) -> dict:
    script = REPO / (module.replace(".", "/") + ".py")
    if not script.is_file():
        return {"status": "absent", "script": str(script.relative_to(REPO))}
    helptext = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                              text=True).stdout
    has = lambda flag: re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext) is not None  # noqa: E731
    args = [] if full else [a for opt in options if has(opt[0]) for a in opt]
    out_json, out_md = tmp / f"{name}.json", tmp / f"{name}.md"
    if has("--json"):
        args += ["--json", str(out_json)]
    elif has("--out"):
        args += ["--out", str(out_md)]
    elif has("--output"):
        args += ["--output", str(out_md)]
    cmd = [sys.executable, "-m", module, *args]
    print(f"\n[bench] {name}: python -m {module} {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    sys.stdout.write(proc.stdout)
    result = {"status": "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
              "script": str(script.relative_to(REPO)), "args": args, "seconds": round(seconds, 1)}
    if proc.returncode != 0:
        result["output_tail"] = proc.stdout[-3000:]
        return result
    if out_json.is_file():
        result["json"] = json.loads(out_json.read_text())
    else:  # a script that prints its results as one JSON object line
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("{") and line.endswith("}"):
                try:
                    result["json"] = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
    text = out_md.read_text() if out_md.is_file() else proc.stdout
    result["tables"] = parse_tables(text)
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
            lines.append(f"| {name} | {res['script']}: no table found in its output | - | - | - | - |")
        for r in rows:
            if r["ratio"] is None:
                ratio = "-"
            elif r["ratio_unit"] == "%":
                ratio = f"{100 * r['ratio']:.2g}%"
            else:
                ratio = f"{r['ratio']:.2f}x"
            lines.append(f"| {name} | {r['what']} | {_fmt(r['value'])} | {r['unit']} | {ratio} | {r['vs']} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace (or insert after the title) the summary section, leaving the other sections alone."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    parts = old.split("\n## ")
    head, sections = parts[0].rstrip("\n"), ["## " + p.strip("\n") for p in parts[1:]]
    sections = [s for s in sections if not s.startswith(SECTION)]
    path.write_text("\n\n".join([head, text.strip("\n"), *sections]) + "\n")


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
        for name, (module, options) in BENCHES.items():
            if args.only and name not in args.only:
                continue
            res = run_bench(name, module, options, args.full, Path(tmp))
            results["benchmarks"][name] = res
            if res["status"] == "ok":
                results["summary"] += summarize(name, res)
    results["machine"] = machine()
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    write_section(Path(args.markdown), text)
    print("\n" + text)
    print(f"[bench] wrote {args.json} and the '{SECTION[3:]}' section of {args.markdown}")
    failed = [n for n, r in results["benchmarks"].items() if r["status"] not in ("ok", "absent")]
    if failed:
        print(f"[bench] FAILED: {', '.join(failed)} (output tails in {args.json})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
