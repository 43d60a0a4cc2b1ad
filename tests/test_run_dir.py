"""`python -m pipeline run-dir RUN_DIR PART`: the launchers ask it for the run-dir layout (no torch)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pipeline.train.run_dir import RunDir


def run_dir_cli(*args: str) -> str:
    code = ("import runpy, sys; sys.argv = ['pipeline', 'run-dir', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('pipeline', run_name='__main__')\n"
            "finally:\n    print('torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "False", "run-dir imported torch"
    return out.stdout.strip()


def test_the_launcher_gets_paths_and_the_resume_point(tmp_path):
    run = tmp_path / "run"
    assert run_dir_cli(str(run), "logs") == str(run / "logs")
    assert run_dir_cli(str(run), "resume-point") == ""  # a fresh start
    RunDir(run).checkpoints.mkdir(parents=True)
    RunDir(run).latest.write_text("step_00000008\n")
    assert run_dir_cli(str(run), "resume-point") == str(run / "checkpoints" / "step_00000008")
    assert RunDir(run).is_run_dir() and not RunDir(tmp_path).is_run_dir()


def test_the_launchers_spell_no_run_dir_path_and_share_the_requeue_code():
    """launch/*.sh ask `run-dir` for paths inside RUN_DIR, and their requeue code is errors.EXIT_REQUEUE."""
    from pipeline.errors import EXIT_REQUEUE

    launch = Path(__file__).resolve().parents[1] / "launch"
    scripts = sorted(launch.glob("*.sh"))
    assert launch / "common.sh" in scripts
    spelled = [f"{p.name}:{n}" for p in scripts for n, line in enumerate(p.read_text().splitlines(), 1)
               if re.search(r"\$\{?RUN_DIR\}?/", line)]
    assert spelled == [], f"ask `python -m pipeline run-dir RUN_DIR PART` instead: {spelled}"
    requeue = re.findall(r"^RMT_EXIT_REQUEUE=(\d+)$", (launch / "common.sh").read_text(), re.M)
    assert requeue == [str(EXIT_REQUEUE)]
