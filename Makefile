# Two commands on a fresh clone: `make demo` and `make test`.
# torch==2.13.0 is installed before the package so that pip never resolves a (multi-GB) CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/data)
export METAXFER_DATA ?= $(if $(wildcard $(SHARED_DATA)/omniglot),$(SHARED_DATA),)
# OpenMP threads sleep instead of spinning while waiting: 3-6x faster on shared cores, ~3% slower on idle ones
# (benchmarks/README.md). Read only when torch loads, so it must be set before the process starts.
# (The allocator is tuned inside the process by metaxfer.runtime.tune_allocator.)
export OMP_WAIT_POLICY ?= PASSIVE
DEMO_STEPS ?= 1000

.PHONY: demo test test-fast install dev clean bench-setup bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev,pretrained]'
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

# Trains ProtoNet 5-way 1-shot on Omniglot for a few minutes, then reports accuracy on 600 fixed test episodes.
demo: $(VENV)/.dev
	@test -n "$(METAXFER_DATA)" || { echo "Omniglot not found: set METAXFER_DATA to the folder holding omniglot/images_background.zip"; exit 1; }
	$(VENV)/bin/metaxfer train --config omniglot/protonet_5w1s --run-dir runs/demo --restart \
		train.steps=$(DEMO_STEPS) train.val_every=500 train.lr_decay_every=400

test: $(VENV)/.dev
	$(PY) -m pytest -q

# Skips slow (real data, training) and multi-process tests.
test-fast: $(VENV)/.dev
	$(PY) -m pytest -q -m "not slow and not distributed"

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

# Speed against the peers (easyfsl 1.5.0, learn2learn 0.2.0) in a separate .venv-bench; see benchmarks/README.md.
bench-setup:
	bash benchmarks/setup_peers.sh

bench: bench-setup
	.venv-bench/bin/python benchmarks/speed_protonet.py --rounds 20 --ablation --memory --out bench-out/protonet.json
	.venv-bench/bin/python benchmarks/speed_maml.py --rounds 10 --out bench-out/maml.json
