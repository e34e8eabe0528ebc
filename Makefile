# fvl: every target does its own set-up (venv + install) first, so a fresh clone needs one command.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel that lies on disk on our machines; override for a CUDA build, e.g. TORCH="torch==2.13.0+cu130".
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.fvl-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup test test-fast test-all lint pretrain finetune florence2-tiny sweep eval shards bench notebooks mlflow-ui learning-check compile-check reliability clean

help:
	@echo "make test       set up .venv, install fvl, run the test suite (unit, integration and e2e tiers)"
	@echo "make test-fast  the unit tier alone (about a minute)"
	@echo "make test-all   every tier, the opt-in ones too (learning, inductor, gpu, heavy)"
	@echo "make pretrain   stage 1 on the tiny preset (ARGS='key=value ...' overrides)"
	@echo "make finetune   stage 2 from the latest pretrain checkpoint (CKPT=path to choose one)"
	@echo "make florence2-tiny  stage 0: the tiny Florence-2 trained on its own tasks (builtin:florence2-tiny)"
	@echo "make sweep      SWEEP=experiments/sweeps/fusion.yaml: a grid of runs (default: the fusion comparison, 14 min cold, ending in its notebook)"
	@echo "make shards     RECIPE=synthetic: build WebDataset shards of a data recipe"
	@echo "make bench      benchmarks (BENCHMARKS.md)"
	@echo "make mlflow-ui  the MLflow UI on http://127.0.0.1:5000"
	@echo "make eval       score the latest checkpoint on the synthetic test split (CKPT=... to choose)"
	@echo "make notebooks  execute the comparison notebooks into outputs/notebooks/"
	@echo "make learning-check  the default runs must learn colour, shape, count, OCR and position (about 11 minutes)"
	@echo "make compile-check   model.vision.compile through inductor (minutes while its cache is cold)"
	@echo "make reliability     the fuzz and kill -9 tests at larger counts (RELIABILITY.md; about 15 minutes)"
	@echo "make lint       ruff"

setup: $(STAMP)

# Torch first, then everything else under a constraint that keeps that exact torch.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	@if nvidia-smi -L 2>/dev/null | grep -q GPU && $(PY) -c "import torch, sys; sys.exit(torch.version.cuda is not None)"; then \
	  echo "!! nvidia-smi lists a GPU but $(TORCH) installed a CPU-only build: training would run on the CPU."; \
	  echo "!! Remove $(VENV) and run again with TORCH set to a CUDA build of torch for this machine."; fi
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev,notebooks,lmms-eval]" && { $(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -q -y torchvision; }
	@touch $(STAMP)

# Two xdist workers (each with one torch thread: tests/conftest.py); `loadfile` keeps a module's tests, and so
# its module-scoped fixtures, on one worker.
XDIST ?= -n 2 --dist loadfile
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not (integration or e2e or learning or inductor or gpu or heavy)" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check fvl tests
	$(VENV)/bin/ruff format --check fvl tests

pretrain: $(STAMP)
	$(VENV)/bin/fvl train experiments/pretrain.yaml $(ARGS)

finetune: $(STAMP)
	$(VENV)/bin/fvl train experiments/finetune.yaml $(if $(CKPT),init_from=$(CKPT)) $(ARGS)

florence2-tiny: $(STAMP)
	$(VENV)/bin/fvl florence2-tiny $(ARGS)

SWEEP ?= experiments/sweeps/fusion.yaml
sweep: $(STAMP)
	$(VENV)/bin/fvl sweep $(SWEEP) $(ARGS)

CKPT ?=
eval: $(STAMP)
	$(VENV)/bin/fvl eval $(if $(CKPT),$(CKPT),latest) $(ARGS)

compile-check: $(STAMP)
	$(PY) -m pytest -q -m inductor tests/models

# Opt-in: the reliability tests of make test at larger counts (10,000 fuzzed samples, 15 kill -9 points).
reliability: $(STAMP)
	$(PY) -m pytest -q -m heavy tests

# Opt-in (about 11 minutes; 652 s measured from a fresh clone): the default pretrain + finetune must score
# colour, shape, count, OCR and position at >= 2x chance (0.75 where chance is 0.5); all five pass
# (BENCHMARKS.md, "Generator 5").
learning-check: $(STAMP)
	$(PY) -m pytest -q -m learning tests

notebooks: $(STAMP)
	$(VENV)/bin/fvl notebooks

RECIPE ?= synthetic
shards: $(STAMP)
	$(VENV)/bin/fvl shards build $(RECIPE) --out shards/$(basename $(notdir $(RECIPE))) $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/fvl bench $(ARGS)

MLFLOW_PORT ?= 5000
mlflow-ui: $(STAMP)
	@mkdir -p mlruns
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info
