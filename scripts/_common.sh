# Shared helpers for scripts/demo.sh and scripts/test.sh (sourced, not run).
# Needs only a Python >= 3.10 with the standard venv module (python3.11 preferred).

die() { echo "error: $*" >&2; exit 1; }

# The interpreter used to create the virtual environment: $PYTHON, else the first of python3.11,
# python3, python that is >= 3.10.
find_python() {
    local candidates=() c
    if [[ -n "${PYTHON:-}" ]]; then candidates=("$PYTHON"); else candidates=(python3.11 python3 python); fi
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 \
            && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
            command -v "$c"
            return 0
        fi
    done
    die "no Python >= 3.10 found (tried: ${candidates[*]}); install Python 3.11 or set PYTHON=/path/to/python3.11"
}

# ensure_venv DIR: create the virtual environment DIR unless a working one is already there.
ensure_venv() {
    local dir="$1" py
    if [[ -x "$dir/bin/python" ]] && "$dir/bin/python" -c 'import sys, pip; sys.exit(sys.version_info < (3, 10))' \
        >/dev/null 2>&1; then
        echo ">> reusing virtual environment $dir ($("$dir/bin/python" --version 2>&1))" >&2
        return 0
    fi
    if [[ -e "$dir" ]]; then
        die "$dir exists but is not a usable virtual environment with Python >= 3.10 and pip; remove it" \
            "(rm -rf $dir) or pick another folder with DEQCORE_VENV=..."
    fi
    py="$(find_python)"
    echo ">> creating virtual environment $dir with $py ($("$py" --version 2>&1))" >&2
    "$py" -m venv "$dir" \
        || die "'$py -m venv' failed; on Debian/Ubuntu install the venv module (apt-get install python3.11-venv)"
}

# Never ask questions (CI has no stdin) and keep pip's output readable in logs.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [[ -n "${CI:-}" ]]; then export PIP_PROGRESS_BAR=off; fi
