# Two commands for a newcomer (README.md):  make demo  ·  make test
# Both set up what is missing (OpenMPI + parallel HDF5 from Debian, .venv with mpi4py, numpy, numba,
# h5py built against parallel HDF5) and reuse it on later runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2
MPIRUN := mpirun -n $(NP) $(if $(filter 0,$(shell id -u)),--allow-run-as-root) --oversubscribe --bind-to none

.PHONY: demo test test-fast setup setup-dev bench clean

setup:
	@bash scripts/setup.sh data,progress

setup-dev:
	@bash scripts/setup.sh data,progress,dev

data/digits.h5: | setup
	@$(PY) -m hpcopt data make digits $@

demo: setup data/digits.h5
	$(MPIRUN) $(PY) -m hpcopt train jobs/digits_mlp.toml run.out_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

test: setup-dev
	$(PY) -m pytest tests -v --durations=15

test-fast: setup-dev
	$(PY) -m pytest tests -m "not slow"

bench: setup-dev
	$(PY) -m hpcopt bench step
	$(PY) -m hpcopt bench optim

clean:
	rm -rf runs .pytest_cache
