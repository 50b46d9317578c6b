# Set-up, main job and checks (README.md). Everything goes into the virtual
# environment $(VENV), created when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CUDA kernels are compiled wherever nvcc exists (they run only on a GPU).
CUDA_HOME ?= /usr/local/cuda
WSSS_FAST_CUDA ?= $(if $(wildcard $(CUDA_HOME)/bin/nvcc),1,0)

.PHONY: install run test bench lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch comes first and the package is built against it (--no-build-isolation);
# pydensecrf2 (the reference CRF of the tests) builds in its own isolated env.
install: $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch torchvision timm triton ninja setuptools wheel
	$(BIN)/python -m pip install pydensecrf2
	CUDA_HOME=$(CUDA_HOME) WSSS_FAST_CUDA=$(WSSS_FAST_CUDA) \
		$(BIN)/python -m pip install --no-build-isolation -e ".[test]"

run: install
	$(BIN)/python -m wsss_fast.train

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Unit tests, then every benchmark once as a smoke test (timings: `make bench`).
test: install lint
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest bench -q --benchmark-disable

bench: install
	$(BIN)/python -m pytest bench --benchmark-only
