"""The engine seam holds: only pipeline/train/engines/deepspeed_zero.py imports deepspeed, and nothing
outside pipeline/train/engines/ names a backend module (the rest asks `engines.backend(cfg)`)."""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.train import engines
from pipeline.train.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
ENGINES = PIPELINE / "train" / "engines"
BACKEND = ENGINES / "deepspeed_zero.py"


def imported_modules(path: Path, depth: int = 1) -> set[str]:
    """The first `depth` dotted parts of every module `path` imports (at any depth of the file: lazy
    imports count); `from a.b import c` counts as a.b and a.b.c."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {".".join(n.split(".")[:depth]) for n in names}


def test_only_the_deepspeed_backend_imports_deepspeed():
    files = sorted(PIPELINE.rglob("*.py"))
    assert BACKEND in files and "deepspeed" in imported_modules(BACKEND)  # the check can see an import
    offenders = [str(p.relative_to(PIPELINE)) for p in files
                 if p != BACKEND and "deepspeed" in imported_modules(p)]
    assert offenders == [], f"import deepspeed only in {BACKEND.name}, behind pipeline.train.engines"


def test_nothing_outside_the_engines_package_names_a_backend_module():
    """The package and the benchmarks get a backend from `engines.backend(cfg)`, so a second backend is
    one module plus its entry in `engines.BACKENDS` (tests of a backend itself may import it)."""
    modules = set(engines.BACKENDS.values())
    files = sorted([*PIPELINE.rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
    offenders = [str(p.relative_to(ROOT)) for p in files if ENGINES not in p.parents
                 and imported_modules(p, depth=4) & modules]
    assert offenders == [], f"ask pipeline.train.engines.backend(cfg) instead of importing {sorted(modules)}"
    # the check can see such an import: the backend itself imports the package it belongs to
    assert "pipeline.train.engines" in imported_modules(BACKEND, depth=3)


def test_the_backend_of_a_config_provides_what_the_package_calls():
    module = engines.backend(config_from_dict({}))
    assert module.__name__ == engines.BACKENDS["deepspeed"] and module is engines.backend()
    for name in ("build", "init_distributed", "checkpoint_layout", "resume_source", "consolidated_state_dict",
                 "config"):
        assert callable(getattr(module, name)), name
    cfg = config_from_dict({"deepspeed": {"zero_stage": 3}})
    assert module.checkpoint_layout(cfg) == {"zero_stage": 3}  # the meta.json field earlier runs have
