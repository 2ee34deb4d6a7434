# Two commands on a fresh machine (README "Quick start"):
#   make run     set up what is missing, then the main job: the federated run, 21 SuperNodes, Ray simulation
#   make test    set up what is missing, then the full test suite (what .ci/run runs)
#   make quick   the fast test lane (no Ray, no SuperLink, no real-data training)
# Options: make run ARGS='strategy="fedprox" fedprox.proximal-mu=0.01'   (run-config key=value pairs, TOML values;
#          RUN_CONFIG=... is the same), RESUME=outputs/<run> (continue a killed run), NODES=21,
#          VENV=.venv, PYTHON=python3.11, TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'.

PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
NODES ?= 21
RUN_CONFIG ?=
ARGS ?= $(RUN_CONFIG)
RESUME ?=

BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed

# Recipes call the venv's python by path; processes they start find its tools (flwr, flower-superlink) on PATH.
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(BIN):$(PATH)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
# `server_app.simulation` makes relative paths (output-dir, resume, data-path, $FEDTIME_DATA_PATH) absolute from here
RUN_KEYS :=
ifneq ($(strip $(RESUME)),)
RUN_KEYS += resume="$(RESUME)"
endif

.PHONY: help run test quick setup

help:  # the default target: what `make` can do, nothing run
	@sed -n '1,7p' $(firstword $(MAKEFILE_LIST))

run: $(STAMP)
	$(BIN)/python -m server_app.simulation --nodes $(NODES) --run-config '$(RUN_KEYS) $(ARGS)'

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs only when the venv lacks the project or pyproject.toml changed since. torch first: the CPU wheel
# (a bare "torch" requirement pulls a multi-GB CUDA build); then the project with its test extras.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -c "import torch, flwr; print('torch', torch.__version__, '| flwr', flwr.__version__)"
	touch $@
