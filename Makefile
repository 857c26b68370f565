# Two commands on a fresh clone: `make run` (pipeline on the sample data, then serve the champion) and
# `make test`. Everything else is a step of those.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
# What `make serve` serves: an alias or a version number (default: register.alias, @champion).
ALIAS ?= $(BONETUMOR_MODEL_ALIAS)

# Telemetry off for every tool, and the venv first on PATH (DVC stages run `bonetumor` from it).
export MLFLOW_DISABLE_TELEMETRY := true
export BENTOML_DO_NOT_TRACK := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Bytecode is cached: with PYTHONDONTWRITEBYTECODE set (some CI images set it) and the --no-compile install below,
# every stage process recompiled torch, MLflow and GX from source, 13 of the 21 s a `bonetumor balance` took.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install run pipeline assess-demo serve bento bench-serving test test-fast lint compile lock clean

# --no-compile: byte-compiling all of torch's and MLflow's modules at install took 1 min 40 s of a 3 min 44 s
# install on 2 cores; Python compiles the modules it imports on first use instead.
$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev]'
	@touch $@

install: $(BIN)/.installed ## Create .venv and install the project with its dev tools

run: pipeline ## Run the pipeline on the sample data, then serve what it registered (page at /ui/)
	@# The sample's model may stay @challenger (the gate's reason is printed above); the demo serves it anyway,
	@# and the page says it is not the champion.
	@$(MAKE) --no-print-directory serve ALIAS=$$($(BIN)/python -c 'import json; print(json.load(open("outputs/register/champion.json"))["alias"])')

pipeline: install ## Everything up to the registered champion (bonetumor check, then dvc repro)
	@# Before DVC deletes any stage output: a typo, a missing data folder or a locked store fails here, in seconds.
	bonetumor check
	dvc repro
	@$(BIN)/python -c 'import json; c=json.load(open("outputs/register/champion.json")); print("registered:", c["model_uri"], "version", c["version"], "(" + c["arch"] + ")"); print("champion gate:", c["gate"]["reason"])'
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

assess-demo: install ## Percent necrosis of the demo slide (the sample's tiles on a known layout) with what the pipeline registered
	bonetumor demo-slide outputs/demo/slide.tif
	bonetumor assess outputs/demo/slide.tif --out outputs/demo/assess --model $$($(BIN)/python -c 'import json; print(json.load(open("outputs/register/champion.json"))["alias"])')

serve: install ## Serve models:/bone-tumor-classifier@champion (ALIAS=challenger or a version for another) on http://$(HOST):$(PORT)
	@echo "Serving @$(or $(ALIAS),champion) on http://$(HOST):$(PORT): the page at http://$(HOST):$(PORT)/ui/, POST /predict (form field 'image'); Ctrl-C stops."
	@echo "A promoted model (bonetumor promote) is picked up within serving.reload_seconds, without a restart."
	cd serving && BONETUMOR_PROJECT_DIR=$(CURDIR) BONETUMOR_MODEL_ALIAS=$(ALIAS) bentoml serve service:BoneTumorClassifier --host $(HOST) --port $(PORT)

bento: install ## Build the service into a Bento (offline): the project wheel, then bentoml build
	rm -rf dist && $(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w dist .
	bentoml build .

bench-serving: install ## Load benchmark of what the pipeline registered (ALIAS= for another): README "Serving"
	$(BIN)/python -m benchmarks.serving_load --alias $(or $(ALIAS),$$($(BIN)/python -c 'import json; print(json.load(open("outputs/register/champion.json"))["alias"])'))

test: install ## Lint, type-check and run the test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

test-fast: install ## The test suite without the tests marked slow (dvc repro, kfp.local, bentoml serve, ...)
	$(BIN)/pytest -m "not slow"

lint: install ## Fix formatting and lint what can be fixed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

compile: install ## Recompile the Kubeflow pipeline YAML
	$(BIN)/python -m pipelines.compile

# requirements.lock: what infra/Dockerfile installs, the project's dependencies and its orchestration extra,
# every package pinned (==), resolved for the image's platform (CPython 3.11 on x86_64 manylinux_2_28)
# whichever machine runs this. uv keeps the versions already in the lock; UPGRADE=1 moves all to the newest.
# Index: PyPI, as for pip here (pip's own config adds only local folders and wheels); a mirror set in
# PIP_INDEX_URL is passed on. torch is pinned as PyPI publishes it for Linux, the CUDA build with the nvidia-*
# runtime it pins: the image's cuda variant installs that, the cpu variant the same version's +cpu build
# from PyTorch's CPU index without those packages (TORCH_CUDA_ONLY in infra/Dockerfile).
# tests/infra/test_lock_and_dockerfile.py fails on a lock that misses a dependency of pyproject.toml.
lock: install ## Re-pin requirements.lock (the image's dependencies) from pyproject.toml; UPGRADE=1 for newest
	$(BIN)/uv pip compile pyproject.toml --extra orchestration --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 $(if $(PIP_INDEX_URL),--index-url $(PIP_INDEX_URL)) \
		$(if $(UPGRADE),--upgrade) --custom-compile-command 'make lock' --quiet -o requirements.lock

clean: ## Remove pipeline outputs and local MLflow state (keeps .venv)
	rm -rf outputs mlflow.db mlflow.db.lock mlartifacts .kfp
