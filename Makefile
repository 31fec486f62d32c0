# diffquant — `make run` runs the main job on the embedded model; `make test` runs the tests.
# Both create .venv and install everything on a fresh machine (CPU torch 2.13.0 first, so that no
# other package pulls a CUDA build).
SHELL := /bin/bash
PY := .venv/bin/python
export WANDB_SILENT := true
export HYDRA_FULL_ERROR ?= 0

.PHONY: help venv run test test-slow test-all clean
help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-18s %s\n", $$1, $$2}'

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
	.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: .venv/.installed  ## create .venv and install the project

run: venv  ## the main job: sample, evaluate and record the embedded ldm_digits (FP)
	$(PY) run.py

test: venv  ## the test suite (< 15 min on 2 cores; `slow` tests excluded)
	$(PY) -m pytest -m "not slow" -q

test-slow: venv  ## the slow end-to-end checks only
	$(PY) -m pytest -m slow -q

test-all: venv  ## everything
	$(PY) -m pytest -q

clean:  ## remove outputs and caches (not the venv)
	rm -rf outputs multirun cache .pytest_cache
