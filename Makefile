# diffquant — `make run` runs the main job on the embedded model; `make test` runs the tests.
# Both create .venv and install everything on a fresh machine (CPU torch 2.13.0 first, so that no
# other package pulls a CUDA build).
SHELL := /bin/bash
PY := .venv/bin/python
export WANDB_SILENT := true
export HYDRA_FULL_ERROR ?= 0

.PHONY: help venv run test test-slow test-all lint format clean
help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-18s %s\n", $$1, $$2}'

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
	.venv/bin/pip install -q --disable-pip-version-check -e '.[test,toolkits]'
	touch $@

venv: .venv/.installed  ## create .venv and install the project

run: venv  ## the main job: sample, evaluate and record the embedded ldm_digits (FP)
	$(PY) run.py

# pytest-xdist workers of `make test`, each running whole test files (tests of one file share
# module fixtures, and the SLURM files one cluster); 2 halves the suite's time on a 2-core machine
TEST_WORKERS ?= 2
test: venv  ## the test suite (< 15 min on 2 cores; `slow` tests excluded; TEST_WORKERS=0: no workers)
	$(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-slow: venv  ## the slow end-to-end checks only
	$(PY) -m pytest -m slow -q

test-all: venv  ## everything
	$(PY) -m pytest -q

lint: venv  ## ruff: lint and format check (also run by the tests)
	.venv/bin/ruff check src tests run.py
	.venv/bin/ruff format --check src tests run.py

format: venv  ## ruff: fix what can be fixed and format
	.venv/bin/ruff check --fix src tests run.py
	.venv/bin/ruff format src tests run.py

clean:  ## remove outputs and caches (not the venv)
	rm -rf outputs multirun cache .pytest_cache

# --- Sweeps and paper tables (experiments/README.md) ------------------------------------------
# One run.py command per table: the sweep config (conf/sweep/) launches the experiment's FP row and
# grid, then writes table.{md,tex,csv} into the sweep folder.
# make sweep EXPERIMENT=quest_imagenet LAUNCHER=slurm ARGS='slurm.partition=gpu'
EXPERIMENT ?= embedded_digits
SWEEP_CONFIG ?= paper
LAUNCHER ?= basic
SWEEP_ARGS = hydra/launcher=$(LAUNCHER) $(if $(SWEEP),hydra.sweep.dir=$(SWEEP))

.PHONY: sweep sweep-embedded tables
sweep: venv  ## EXPERIMENT=<conf/experiment name> [SWEEP_CONFIG=paper|ablations] [LAUNCHER=basic|local|slurm] [SWEEP=dir] [ARGS=overrides]
	$(PY) run.py experiment=$(EXPERIMENT) sweep=$(SWEEP_CONFIG) $(SWEEP_ARGS) $(ARGS)

sweep-embedded: venv  ## the README's embedded tables (quality + cost): the three digits models x bits x methods, QuEST ablations
	$(PY) run.py experiment=embedded_digits sweep=embedded $(SWEEP_ARGS) $(ARGS)

tables: venv  ## SWEEP=<sweep dir>: (re)build table.{md,tex,csv} of a sweep, e.g. one with failed jobs
	@test -n "$(SWEEP)" || { echo "usage: make tables SWEEP=<sweep dir> [TABLE_ARGS='--experiment NAME']"; exit 2; }
	$(PY) -m diffquant.tables $(SWEEP) $(TABLE_ARGS)

.PHONY: bench-accuquant bench-speed bench-forward bench-scale bench-paper-size bench-act-init
bench-speed: venv  ## fake-quant vs FP sampling time (one process per setting) -> outputs/bench/sampling_speed_*.json
	$(PY) -m diffquant.bench.sampling_speed -m model=ldm_digits quant=w8a8,w4a8,w4a4 method=ptq +bench.samples=100 +bench.repeats=3 $(ARGS)
	$(PY) -m diffquant.bench.sampling_speed -m model=ldm_digits quant=w4a4 method=quest +bench.samples=100 +bench.repeats=3 $(ARGS)
	$(PY) -m diffquant.bench.sampling_speed -m model=dit_digits quant=w4a8 method=ptq +bench.samples=100 +bench.repeats=3 $(ARGS)
bench-forward: venv  ## one full-size Bedroom UNet forward (274 M, random weights): FP vs fake-quant W8A8, weights per call vs frozen -> outputs/bench/
	$(PY) -m diffquant.bench.forward_cost --model ldm_bedroom --bits 8 8 --batch 2 --repeats 5 --threads 2 $(ARGS)
BASELINE ?= 28ec9d6
bench-scale: venv  ## full-size Bedroom: forward FP / fake-quant / frozen / int8, reconstruction cost per iteration (and vs BASELINE), projected paper calibration, the iteration's lower bound at the matrix-product peaks (roofline) -> outputs/bench/ (ARGS='--device cuda' on a GPU)
	$(PY) -m diffquant.bench.scale --threads 2 $(ARGS)
	$(PY) -m diffquant.bench.scale --threads 2 --baseline $(BASELINE) --repeats 2 $(ARGS)
	$(PY) -m diffquant.bench.scale --threads 2 --baseline $(BASELINE) --repeats 2 --compile $(ARGS)
	$(PY) -m diffquant.bench.scale --threads 2 --baseline $(BASELINE) --repeats 2 --iters 8 --autocast bf16 --compile $(ARGS)
	$(PY) -m diffquant.bench.roofline --threads 2 --against outputs/bench $(ARGS)
bench-paper-size: venv  ## method=ptq_paper through run.py on a full-size random-weight Bedroom folder, 2 iterations per stage: peak RSS and disk per unit -> outputs/bench/ (ARGS: run.py overrides replacing the default)
	$(PY) -m diffquant.bench.paper_size $(ARGS)
bench-act-init: venv  ## full-size Bedroom: peak RSS of ptq_paper's and QuEST's activation-range init (one forward), attention in query blocks (20, 64 rows) vs all queries at once (20 rows; 64 would exceed 24 GB) -> outputs/bench/
	$(PY) -m diffquant.bench.act_init_memory --rows 20 --whole-attention $(ARGS)
	$(PY) -m diffquant.bench.act_init_memory --rows 20 $(ARGS)
	$(PY) -m diffquant.bench.act_init_memory --rows 64 $(ARGS)
	$(PY) -m diffquant.bench.act_init_memory --quest --rows 20 --whole-attention $(ARGS)
	$(PY) -m diffquant.bench.act_init_memory --quest --rows 20 $(ARGS)
	$(PY) -m diffquant.bench.act_init_memory --quest --rows 64 $(ARGS)
	$(PY) -m diffquant.bench.act_init_memory --quest --method percentile --rows 20 --whole-attention $(ARGS)
	$(PY) -m diffquant.bench.act_init_memory --quest --method percentile --rows 20 $(ARGS)
bench-accuquant: venv  ## AccuQuant peak memory + time of one group, M = 1,2,4,8 x exact/approx -> outputs/bench/
	$(PY) -m diffquant.bench.accuquant_memory --out outputs/bench $(ARGS)
