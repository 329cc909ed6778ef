#!/usr/bin/env bash
# The whole check, as CI runs it (.ci/run calls this): create (or reuse) .venv, install tox into it,
# and run the tox envs lint, torch, jax, both, plugin, numpy, docs (see tox.ini). Exits with tox's status.
#
#   bash scripts/test.sh                    # tox run -e lint,torch,jax,both,plugin,numpy,docs
#   bash scripts/test.sh run -e torch -- -k anderson     # any other tox arguments
#
# Environment: PYTHON (interpreter for a new venv), DEQCORE_VENV (venv folder, default .venv),
# DEQCORE_DATA (data folder for data tests; tox defaults it to ../shared/data).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_common.sh

start=$SECONDS
venv="${DEQCORE_VENV:-.venv}"
ensure_venv "$venv"
echo ">> pip install 'tox>=4.11'" >&2
"$venv/bin/python" -m pip install --quiet 'tox>=4.11'

if [[ $# -eq 0 ]]; then set -- run -e lint,torch,jax,both,plugin,numpy,docs; fi
echo ">> tox $*" >&2
rc=0
"$venv/bin/python" -m tox "$@" || rc=$?
echo ">> scripts/test.sh: tox exited with status $rc after $((SECONDS - start)) s" >&2
exit "$rc"
