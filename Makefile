# loraplex: `make serve` and `make test` do all their own set-up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup model serve test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,ray]'
	$(BIN)/python -m server.cpu_kernel
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(BIN)/loraplex fetch-model

serve: model
	$(BIN)/loraplex serve --host 127.0.0.1 --port 8000 --adapters-dir adapters

test: model
	$(BIN)/python -m pytest -q

bench: model
	$(BIN)/python -m loadtest bench-local --scenario cpu-reference --out bench-out

clean:
	rm -rf $(VENV) build *.egg-info
