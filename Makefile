# petl-bench: obvious targets. `make install`, `make test`, `make bench DATASET=msrvtt`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= synthetic
SEEDS ?= 1
# runs at once: auto = one per core without a GPU (each run uses one thread), one at a time with GPUs
PARALLEL ?= auto
SWEEP ?= experiments/$(DATASET).yaml
# the committed record of a benchmark (report.md + plots); only `make record` writes it, never `make bench`/`report`
RECORD ?= experiments/$(DATASET)
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
# One BLAS/OpenMP thread per process: on a small CPU machine the data-loader workers share the cores, and spinning
# OpenMP threads then slow the tiny synthetic models by an order of magnitude (measured: 19.7 vs 1466 ms per step).
export OMP_NUM_THREADS ?= 1

.PHONY: install test test-slow test-all bench record sweep report params synth perf lint clean

install:  ## create .venv and install the package with its test tools (torch 2.14.1 + torchvision 0.29.1)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'

test:  ## the fast suite (a few minutes on 2 CPU cores)
	$(PY) -m pytest -m "not slow" -q

test-slow:  ## the heavier end-to-end tests
	$(PY) -m pytest -m slow -q

test-all:  ## everything
	$(PY) -m pytest -q

bench:  ## sweep every method of experiments/$(DATASET).yaml on $(DATASET) into results/$(DATASET)/; SEEDS=3 for mean ± std; FORCE=1 redoes runs
	$(PY) -m petl_bench.cli bench --dataset $(DATASET) --seeds $(SEEDS) --parallel $(PARALLEL) $(if $(FORCE),--force,)

record:  ## refresh the committed record $(RECORD)/ (report + plots) from a 3-seed bench: an explicit step, never a side effect
	$(MAKE) bench SEEDS=3
	$(PY) -m petl_bench.cli report --dataset $(DATASET) --out $(RECORD) > /dev/null

sweep:  ## run a whole sweep file (default experiments/$(DATASET).yaml, all its seeds); DRY=1 prints the commands
	$(PY) -m petl_bench.cli sweep $(SWEEP) --parallel $(PARALLEL) $(if $(FORCE),--force,) $(if $(DRY),--dry-run,)

report:  ## rewrite results/$(DATASET)/report.md and its plots from the run records
	$(PY) -m petl_bench.cli report --dataset $(DATASET)

params:  ## trainable / total parameters of every method on ViT-B/32
	$(PY) -m petl_bench.cli params --backbone ViT-B-32

perf:  ## step time, peak memory, checkpoint size, eval / loader / loop cost of every method vs full fine-tuning (ARGS=...)
	$(PY) -m petl_bench.cli perf $(ARGS)

synth:  ## generate the synthetic clips and the synthetic pre-trained backbone
	$(PY) -m petl_bench.cli synth

lint:
	$(VENV)/bin/ruff check .

clean:
	rm -rf results/*/runs logs .pytest_cache
