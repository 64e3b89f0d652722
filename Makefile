# Every target creates the virtual environment it needs when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned so pip takes the local CPU build instead of CUDA wheels.
TORCH  ?= torch==2.13.0

.PHONY: venv kernels demo test test-all bench arena clean

$(BIN)/hybridattn: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/hybridattn

# The main job: trains softmax, linear and 3:1 hybrid models on MQAR (3 seeds) and writes arena-quick/report.html.
kernels: venv
	$(BIN)/hybridattn build-kernels

arena: kernels
	$(BIN)/hybridattn arena --preset quick

demo: venv
	$(BIN)/hybridattn --help
	$(BIN)/hybridattn demo

# The fast subset (what CI runs); `make test-all` includes the cases marked slow.
test: kernels
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-all: kernels
	$(BIN)/python -m pytest -q -n 2

bench: venv
	$(BIN)/python -m hybridattn.bench.run_all

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
