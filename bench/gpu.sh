#!/usr/bin/env bash
# GPU readiness in one shot (see bench/gpu.py): ingest, TopK training on the device with and without
# bf16 autocast, the device's own bf16 matmul rate, and the reader's tokens/s.
#   bash bench/gpu.sh                       # on a GPU machine (under 8 minutes on one GPU)
#   bash bench/gpu.sh --device cpu --tiny   # CPU dry run (part of `make test`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout 480 "$PY" bench/gpu.py "$@"
