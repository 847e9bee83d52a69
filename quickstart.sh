#!/usr/bin/env bash
# fastode quickstart: `bash quickstart.sh demo` runs the main job, `bash quickstart.sh test` runs the tests.
#
# Both install what they need into fastode's own virtual environment (default ./.venv, override with
# FASTODE_VENV=DIR), never into the Python that runs this script. A second run installs nothing and builds
# nothing when neither the requirements nor csrc/ changed.
#
#   demo: torch + numpy (core), the demo extra (tqdm, matplotlib, torchdiffeq as the peer), the C++ extension.
#   test: the above, plus the test extra (pytest, scipy, torchdiffeq, torchode, hypothesis, ...) and Triton
#         (its interpreter runs the kernel tests on the CPU).
#
# torch: a compatible torch (>= 2.4) already in the virtual environment is kept. A new environment reuses
# the torch of the Python that creates it (--system-site-packages) when that one has a compatible torch;
# otherwise torch==2.13.0 is installed: the default (CUDA) build where `nvidia-smi` finds a GPU, else the CPU
# build from PyTorch's CPU index (FASTODE_TORCH_INDEX overrides that index; set it empty to use pip's defaults).
set -euo pipefail
cd "$(dirname "$0")"

BASE_PY=${PYTHON:-python3}
VENV=${FASTODE_VENV:-.venv}
TORCH_PIN="torch==2.13.0"
CPU_INDEX=${FASTODE_TORCH_INDEX-https://download.pytorch.org/whl/cpu}

say() { echo "quickstart: $*"; }

torch_ok() {  # does python "$1" import a torch >= 2.4?
    "$1" - <<'PYEOF' 2>/dev/null
import sys
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PYEOF
}

make_venv() {
    if [ -x "$VENV/bin/python" ]; then
        return
    fi
    if ! command -v "$BASE_PY" >/dev/null; then
        say "no '$BASE_PY' on the PATH; set PYTHON=/path/to/python3 (3.10 or newer)"
        exit 1
    fi
    local flags=()
    if torch_ok "$BASE_PY"; then
        flags+=(--system-site-packages)
        say "reusing the torch of $BASE_PY ($("$BASE_PY" -c 'import torch; print(torch.__version__)'))"
    fi
    say "creating the virtual environment $VENV (from $BASE_PY)"
    if ! "$BASE_PY" -m venv "${flags[@]}" "$VENV"; then
        say "could not create $VENV with '$BASE_PY -m venv'; on Debian/Ubuntu: apt install python3-venv"
        exit 1
    fi
}

index_reachable() {  # a quick look, so that pip does not spend minutes retrying an index it cannot reach
    "$PY" - "$1" <<'PYEOF' 2>/dev/null
import sys
import urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
PYEOF
}

install_torch() {
    if torch_ok "$PY"; then
        return
    fi
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        say "installing $TORCH_PIN (CUDA build: nvidia-smi found a GPU)"
        "$PY" -m pip install -q "$TORCH_PIN"
    elif [ -n "$CPU_INDEX" ] && index_reachable "$CPU_INDEX"; then
        say "installing $TORCH_PIN (CPU build: no GPU found; index $CPU_INDEX)"
        "$PY" -m pip install -q "$TORCH_PIN" --extra-index-url "$CPU_INDEX"
    else
        if [ -n "$CPU_INDEX" ]; then
            say "no GPU found, but $CPU_INDEX cannot be reached: installing $TORCH_PIN from pip's configured"
            say "indexes (on a machine without a local CPU wheel that can be a CUDA build of several GB;"
            say "set FASTODE_TORCH_INDEX to a reachable CPU index to avoid it)"
        else
            say "installing $TORCH_PIN (pip's configured indexes)"
        fi
        "$PY" -m pip install -q "$TORCH_PIN"
    fi
}

install() {  # $1: the extras to install (demo or test)
    make_venv
    PY="$(cd "$VENV" && pwd)/bin/python"  # absolute: CMake runs it from its build directory
    local stamp="$VENV/.fastode-$1.stamp"
    local want
    want=$(cat quickstart.sh setup.py | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && torch_ok "$PY"; then
        say "requirements of '$1' already installed in $VENV"
    else
        install_torch
        say "installing fastode[$1] into $VENV"
        "$PY" -m pip install -q setuptools wheel ninja pybind11
        if [ "$1" = test ]; then
            # Triton is optional (the CPU paths need none); its interpreter runs the kernel tests.
            "$PY" -m pip install -q triton || say "triton could not be installed; the Triton tests will be skipped"
        fi
        # editable and without the extension: it is built below, in place, only when csrc/ changed
        FASTODE_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation -e ".[$1]"
        echo "$want" > "$stamp"
    fi
}

case "${1:-}" in
    demo)
        install demo
        shift
        PYTHON="$PY" bash csrc/build_inplace.sh
        say "running: $PY -m fastode demo $*"
        "$PY" -m fastode demo "$@"
        ;;
    test)
        install test
        shift
        PYTHON="$PY" bash csrc/ci_build_and_test.sh
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$PY" -m pytest tests -q "$@"
        ;;
    *)
        echo "usage: bash quickstart.sh demo   # train a small CNF with fastode vs torchdiffeq (main job)"
        echo "       bash quickstart.sh test   # install and run the test suite (what CI runs)"
        echo "Both install into their own virtual environment, $VENV (FASTODE_VENV=DIR to change it)."
        exit 2
        ;;
esac
