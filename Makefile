# One entry point for people and CI. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# The export/dev extras need torch and, for OpenCLIP, a torchvision built for that torch.
# This pair installs from PyPI (a CUDA build that runs on the CPU; ~5.5 GB with its nvidia-*
# wheels); PyPI's torchvision does not import beside the 2.13.0+cpu wheel. On aarch64 use
# TORCH="torch==2.9.1 torchvision==0.24.1".
TORCH ?= torch==2.14.1 torchvision==0.29.1

.DEFAULT_GOAL := help
.PHONY: help venv setup setup-dev proto test test-quick lint format demo bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(BIN)/python

setup: venv  ## install the server and client (what `make demo` needs)
	$(PIP) install -q -e ".[server]"

setup-dev: venv  ## install everything: server, export (torch), test and lint tools
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"

proto: ## regenerate the gRPC stubs from protos/ (needs setup-dev)
	$(BIN)/python protos/generate.py

demo: setup  ## the main job: start the server on the demo model, ingest, search, stop
	$(BIN)/clipsearch demo

# `pytest`, not `python -m pytest`: the latter puts the repository root on sys.path (see
# README, Layout; tests/conftest.py guards against it too).
test: setup-dev  ## install and run the whole test suite (what CI runs)
	$(BIN)/pytest -q

test-quick: setup-dev  ## the suite without the tests marked slow (Milvus server, training)
	$(BIN)/pytest -q -m "not slow"

lint: ## ruff + mypy (needs setup-dev)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup-dev  ## encoder benchmark (minutes; exports random ViT-B/32 on first use)
	$(BIN)/clipsearch bench encoder

clean:
	rm -rf build dist *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
