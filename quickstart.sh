#!/usr/bin/env bash
# fastode quickstart: `bash quickstart.sh demo` runs the main job, `bash quickstart.sh test` runs the tests.
# Both first install everything they need (idempotent: a second run installs nothing new).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install() {
    # Reuse an installed torch >= 2.4 (it may be a CUDA build on a GPU machine); otherwise pin 2.13.0,
    # because an unpinned `torch` can pull a multi-GB CUDA build onto a CPU-only machine.
    if ! "$PY" - <<'PYEOF' 2>/dev/null
import torch, sys
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PYEOF
    then
        "$PY" -m pip install -q "torch==2.13.0"
    fi
    "$PY" -m pip install -q numpy scipy tqdm matplotlib ninja pybind11 setuptools wheel
    # Triton is optional for fastode (CPU paths need none) but its interpreter runs the kernel tests.
    "$PY" -m pip install -q triton || echo "quickstart: triton could not be installed; Triton tests will be skipped"
    "$PY" -m pip install -q pytest pytest-benchmark "torchdiffeq==0.2.5" torchode scikit-learn
    # --no-build-isolation: build the C++ extension against the torch installed above.
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
}

case "${1:-}" in
    demo)
        install
        shift
        "$PY" -m fastode demo "$@"
        ;;
    test)
        install
        shift
        if [ -x csrc/ci_build_and_test.sh ] || [ -f csrc/ci_build_and_test.sh ]; then
            bash csrc/ci_build_and_test.sh
        fi
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$PY" -m pytest tests -q "$@"
        ;;
    *)
        echo "usage: bash quickstart.sh demo   # train a small CNF with fastode vs torchdiffeq (main job)"
        echo "       bash quickstart.sh test   # install and run the test suite"
        exit 2
        ;;
esac
