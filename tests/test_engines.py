"""The engine seam holds: only pipeline/train/engines/deepspeed_zero.py imports deepspeed."""

from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
BACKEND = PIPELINE / "train" / "engines" / "deepspeed_zero.py"


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (at any depth of the file: lazy imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_deepspeed_backend_imports_deepspeed():
    files = sorted(PIPELINE.rglob("*.py"))
    assert BACKEND in files and "deepspeed" in imported_modules(BACKEND)  # the check can see an import
    offenders = [str(p.relative_to(PIPELINE)) for p in files
                 if p != BACKEND and "deepspeed" in imported_modules(p)]
    assert offenders == [], f"import deepspeed only in {BACKEND.name}, behind pipeline.train.engines"
