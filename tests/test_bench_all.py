"""`make bench` (bench/run_all.py): summary rows from each benchmark's JSON, the BENCHMARKS.md section
writer, and one real benchmark run end to end (results.json, the summary section replacing its old
self, the other sections kept)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run_all import SECTION, summarize
from bench.sections import write_section

REPO = Path(__file__).resolve().parents[1]


def test_summary_rows_come_from_each_benchmarks_json():
    shards = {"baseline": "check", "rows": [
        {"run": "copy", "workers": 1, "images_per_s": 500.0, "mb_per_s": 20.0, "vs_check": 1.0},
        {"run": "ffcv", "workers": 2, "images_per_s": 125.5, "mb_per_s": 5.0, "vs_check": 0.25}]}
    assert [(r["what"], r["value"], r["ratio"], r["vs"]) for r in summarize("shards", shards)] == [
        ("copy, 1 worker(s)", 500.0, 1.0, "check in 1 process"),
        ("ffcv, 2 worker(s)", 125.5, 0.25, "check in 1 process")]
    data = {"rows": [
        {"split": "train", "rand_augment": "yes", "workers": 1, "pipeline": "baseline", "images_per_s": 9.0,
         "images_per_s_per_core": 10.0, "per_core_vs_baseline": 1.0},
        {"split": "val", "rand_augment": None, "workers": 2, "pipeline": "ffcv", "images_per_s": 50.0,
         "images_per_s_per_core": 40.0, "per_core_vs_baseline": 4.0},
        {"split": "val", "rand_augment": None, "workers": 2, "pipeline": "ffcv-device", "images_per_s": 90.0,
         "images_per_s_per_core": 400.0, "per_core_vs_baseline": 40.0, "per_core_vs_cpu_path": 10.0}]}
    assert [(r["what"], r["value"], r["ratio"], r["vs"]) for r in summarize("data", data)] == [
        ("val loader ffcv, 2 worker(s)", 40.0, 4.0, "per core vs ImageFolder + timm"),  # no baseline row
        ("val loader ffcv-device, 2 worker(s), CPU side", 400.0, 10.0,
         "per core vs the same format's CPU decode path"),
        ("data.decode=device: decode + augment of a batch on the GPU", None, None, "unmeasured (no GPU)")]
    assert summarize("engine", {"note": "an older bench_engine without the step numbers"}) == []


def test_write_section_replaces_in_place_appends_or_goes_first(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    write_section(md, "## A\n\none\n")  # a missing file starts with the title
    write_section(md, "## B\n\ntwo")
    write_section(md, "## A\n\nnew one")  # replaced where it stands, B kept after it
    write_section(md, "## Summary\n\nfirst", first=True)
    assert md.read_text() == "# Benchmarks\n\n## Summary\n\nfirst\n\n## A\n\nnew one\n\n## B\n\ntwo\n"


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
