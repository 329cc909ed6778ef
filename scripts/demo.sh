#!/usr/bin/env bash
# Newcomer demo: create (or reuse) .venv, install deqcore with PyTorch, JAX and matplotlib, and run
# `python -m deqcore_models.demo`: train MDEQ on Fashion-MNIST from the local data folder (never
# downloaded), then solve the trained layer with every solver on PyTorch and JAX.
#
#   bash scripts/demo.sh                 # data from $DEQCORE_DATA, else ../shared/data; output in demo-output/
#   bash scripts/demo.sh --out demo-2 --backend torch    # extra flags go to the demo (--help lists them)
#
# Environment: PYTHON (interpreter for a new venv), DEQCORE_VENV (venv folder, default .venv),
# DEQCORE_DATA (data folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_common.sh

venv="${DEQCORE_VENV:-.venv}"
ensure_venv "$venv"
echo ">> pip install 'torch==2.13.0' -e '.[jax,demo]'" >&2
"$venv/bin/python" -m pip install 'torch==2.13.0' -e '.[jax,demo]'

data="${DEQCORE_DATA:-../shared/data}"
echo ">> python -m deqcore_models.demo --data $data $*" >&2
exec "$venv/bin/python" -m deqcore_models.demo --data "$data" "$@"
