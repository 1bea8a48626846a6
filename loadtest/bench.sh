#!/usr/bin/env bash
# `make bench`: random adapters + a local `loraplex serve` + cpu-reference.yaml -> bench-out/.
# Extra arguments go to `python -m loadtest bench-local` (e.g. --scenario cold-adapters --out bench-cold).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "${PYTHON:-.venv/bin/python}" -m loadtest bench-local --scenario cpu-reference --out bench-out "$@"
