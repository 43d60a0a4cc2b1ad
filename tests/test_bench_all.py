"""`make bench` (bench/run_all.py): markdown table parsing, and one real benchmark run end to end
(results.json, the summary section replacing its old self, the other sections kept)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run_all import SECTION, parse_tables, summarize

REPO = Path(__file__).resolve().parents[1]


def test_parse_tables_and_generic_summary():
    text = "\n".join([
        "intro", "", "| run | workers | images/s | vs. base |", "|---|---|---|---|",
        "| copy | 1 | 500 | 1.00x |", "| ffcv | 2 | 125.5 | 0.25x |", "", "text",
        "| a | b |", "|:-|-:|", "| x | 3 |",
    ])
    tables = parse_tables(text)
    assert tables == [[{"run": "copy", "workers": "1", "images/s": "500", "vs. base": "1.00x"},
                       {"run": "ffcv", "workers": "2", "images/s": "125.5", "vs. base": "0.25x"}],
                      [{"a": "x", "b": "3"}]]
    rows = summarize("engine", {"tables": tables})  # an unknown benchmark: first rate, last ratio
    assert [(r["what"], r["value"], r["unit"], r["ratio"], r["vs"]) for r in rows] == [
        ("copy, workers 1", 500.0, "images/s", 1.0, "vs. base"),
        ("ffcv, workers 2", 125.5, "images/s", 0.25, "vs. base"), ("x", 3.0, "b", None, "")]
    units = parse_tables("| what | time | vs step |\n|---|---|---|\n| EMA update | 4.6 ms | 1.38% |")
    assert [(r["what"], r["value"], r["unit"]) for r in summarize("other", {"tables": units})] == [
        ("EMA update, vs step 1.38%", 4.6, "time (ms)")]
    shards = summarize("shards", {"tables": tables[:1]})
    assert [(r["what"], r["value"], r["ratio"], r["vs"]) for r in shards] == [
        ("copy, 1 worker(s)", 500.0, 1.0, "base"), ("ffcv, 2 worker(s)", 125.5, 0.25, "base")]


@pytest.mark.slow
def test_run_all_writes_json_and_its_section_only(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\n{SECTION}\n\nold summary\n\n## Shards\n\nkept as is\n")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "bench/run_all.py", "--only", "shards", "--json", str(out),
                           "--markdown", str(md)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert list(res["benchmarks"]) == ["shards"] and res["benchmarks"]["shards"]["status"] == "ok"
    assert res["machine"]["cpus"] >= 1 and res["command"].startswith("make bench")
    rows = res["summary"]
    assert len(rows) == 9 and all(r["bench"] == "shards" and r["value"] > 0 for r in rows)
    check = [r for r in rows if r["what"].startswith("read + copy mode's check")]
    assert check[0]["ratio"] == 1.0  # the baseline of its own ratio column
    text = md.read_text()
    assert "old summary" not in text and text.count(SECTION) == 1
    assert text.index(SECTION) < text.index("## Shards") and "kept as is" in text
    assert "| shards | copy (wds, original bytes), 1 worker(s) |" in text
