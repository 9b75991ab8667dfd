# `make demo` runs the demo on the bundled fixtures; `make test` runs the test suite.
# TORCH picks the torch requirement: the default pulls whatever pip chooses (a CUDA build on Linux);
# CI passes TORCH=torch==2.13.0 for the CPU build.
PYTHON ?= python3
TORCH ?= torch
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install fixtures bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "lycoris-lora==4.1.3"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@bash scripts/demo.sh $(BIN)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

fixtures: $(STAMP)
	$(BIN)/python fixtures/make_fixtures.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cli.py
	$(BIN)/python benchmarks/bench_merge.py
	$(BIN)/python benchmarks/bench_svd_extract.py
	$(BIN)/python benchmarks/bench_onnx.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
