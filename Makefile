# rmt-pipeline. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# Debian packages FFCV needs to build (libjpeg-turbo, OpenCV, pkg-config).
SYSTEM_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config
PYTEST_ARGS ?=

.PHONY: help setup test test-fast lint
help:  ## this list
	@grep -E '^[a-z-]+:[^#]*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):[^#]*## /  make \1\t/' | expand -t 24

setup: $(STAMP)  ## create .venv with the project, FFCV and dev tools (idempotent; quick when nothing changed)

$(STAMP): pyproject.toml
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages: $$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing system packages: $$missing"; \
	    echo "install them (Debian/Ubuntu: sudo apt-get install -y $$missing) and run 'make setup' again"; \
	    exit 1; \
	  fi; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[ffcv,dev]"
	touch $(STAMP)

test: setup  ## the whole test suite, slow tests and the SLURM tests included (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup  ## the suite without tests marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup  ## ruff
	$(VENV)/bin/ruff check pipeline tests bench

# ---- SLURM (launch/): real one-node and two-node clusters on this machine, for the launch-script tests ----
.PHONY: slurm-up slurm-down slurm-mn-up slurm-mn-down slurm-test
slurm-up:  ## install (as root, if missing) and start munged + slurmctld + slurmd; then: source $$SLURM_LOCAL_DIR/env.sh
	bash tests/slurm/start-local-slurm.sh

slurm-down:  ## stop the daemons slurm-up started (and cancel the cluster's jobs)
	bash tests/slurm/stop-local-slurm.sh

slurm-mn-up:  ## as root: a 2-node cluster, each slurmd in its own network namespace; then: source /tmp/mn-slurm/env.sh
	MN_SLURM_CPUS=$${MN_SLURM_CPUS:-4} MN_SLURM_SLURMD_TIMEOUT=$${MN_SLURM_SLURMD_TIMEOUT:-36} bash tests/slurm/start-multinode-slurm.sh 2

slurm-mn-down:  ## stop the 2-node cluster and remove its namespaces, links and /etc/hosts lines
	bash tests/slurm/stop-multinode-slurm.sh

slurm-test: setup  ## the SLURM tests, one node and two nodes (each starts and stops its cluster when not up)
	$(PY) -m pytest -m slurm $(PYTEST_ARGS)

# ---- data: fake ImageNet, shards (pipeline/data/convert/{fake,shards,verify}.py) ----
SRC ?=
OUT ?= shards/imagenet1k
FORMATS ?= wds ffcv
WORKERS ?=
CLASSES ?= 1000
SHARDS_ARGS ?=
LABELS ?=
FAKE_OUT ?= data/fake-imagenet
FAKE_ARGS ?= --layouts all
.PHONY: fake-imagenet shards verify-shards bench-shards
fake-imagenet: setup  ## a small learnable fake ImageNet in every layout under FAKE_OUT (FAKE_ARGS: see --help)
	$(PY) -m pipeline fake-imagenet --out $(FAKE_OUT) $(FAKE_ARGS)

shards: setup  ## SRC=/data/imagenet [OUT=shards/imagenet1k FORMATS="wds ffcv" WORKERS=n CLASSES=1000 LABELS=maps]
	@test -n "$(SRC)" || { echo "error: set SRC to your ImageNet folder: make shards SRC=/data/imagenet"; exit 2; }
	$(PY) -m pipeline shards --src "$(SRC)" --out "$(OUT)" --formats $(FORMATS) --classes $(CLASSES) \
	  $(if $(WORKERS),--workers $(WORKERS)) $(if $(LABELS),--labels "$(LABELS)") $(SHARDS_ARGS)

verify-shards: setup  ## re-read OUT: checksums, counts, keys, labels, every image decodes
	$(PY) -m pipeline verify-shards "$(OUT)" $(if $(WORKERS),--workers $(WORKERS))

bench-shards: setup  ## images/s and MB/s of make shards on fake ImageNet; writes BENCHMARKS.md "## Shards"
	$(PY) bench/bench_shards.py

# ---- data loaders (pipeline/data/load/{loader,wds,ffcv,augment,sampler}.py) ----
.PHONY: bench-data
bench-data: setup  ## images/s per core of the train/val pipelines: baseline vs WebDataset vs FFCV; writes BENCHMARKS.md "## Data loading"
	$(PY) bench/bench_data.py

# ---- model (pipeline/models/) ----
.PHONY: bench-model
bench-model: setup  ## RMT-T/S training steps at 224: our MaSA vs the straightforward one, fp32 and bf16
	$(PY) -m bench.bench_model --checkpointing --json bench/model_results.json

# ---- first run and all benchmarks (pipeline/demo.py, pipeline/report.py, bench/run_all.py) ----
FORMAT ?= wds
TL ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
.PHONY: demo bench
demo: setup  ## fake ImageNet -> shards -> train on 2 CPU processes, SIGTERM, resume -> eval, export, plots [FORMAT=wds|ffcv TL=1]
	$(PY) -m pipeline demo --format $(FORMAT) $(if $(TL),--token-label) $(DEMO_ARGS)

bench: setup  ## every CPU benchmark (model, data, shards, engine); one table; bench/results.json + BENCHMARKS.md
	$(PY) bench/run_all.py $(BENCH_ARGS)

# ---- training engine (pipeline/train/) ----
.PHONY: bench-engine bench-gpu
bench-engine: setup  ## CPU: the engine's own per-step overhead (EMA, metrics, agreement) and checkpoint save/load s/GB; writes BENCHMARKS.md "## Training engine"
	$(PY) bench/bench_engine.py --write

bench-gpu: setup  ## one GPU (~8 min on an H200): RMT-B/L steps at 224, bf16, ZeRO-2, with/without activation checkpointing, synthetic vs loader
	$(PY) bench/bench_gpu.py --out bench/gpu_results.jsonl
