#!/usr/bin/env bash
# CI for the C++ backend (called by quickstart.sh test, i.e. .ci/run):
#   1. build the extension fastode._C in place (skipped when the built module is newer than every source
#      file and imports), failing loudly instead of falling back to pure Python;
#   2. check that fastode.cpp loads it;
#   3. configure + build the torch-free core and its unit tests with CMake in a temporary directory and
#      run them with ctest (built-in GEMM, and libtorch's MKL).
# About one minute on an idle 2-core machine (two ~20 s compiles of core.cpp, one of bindings.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$(date +%s)

so=$(ls fastode/_C*.so 2>/dev/null | head -n 1 || true)
newer=""
if [ -n "$so" ]; then
    newer=$(find csrc setup.py -newer "$so" \( -name '*.cpp' -o -name '*.h' -o -name setup.py \) -print -quit)
fi
if [ -z "$so" ] || [ -n "$newer" ] || ! "$PY" -c "import torch, fastode._C" 2>/dev/null; then
    echo "ci_build_and_test: building fastode._C in place"
    FASTODE_REQUIRE_EXT=1 "$PY" setup.py -q build_ext --inplace
else
    echo "ci_build_and_test: $so is up to date"
fi
"$PY" - <<'PYEOF'
import sys
import fastode.cpp as c
info = c.build_info()
print("ci_build_and_test: fastode.cpp.build_info() =", info)
sys.exit(0 if info["available"] else 1)
PYEOF

build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
if ! cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v "$PY")" \
        > "$build/configure.log" 2>&1; then
    cat "$build/configure.log"
    exit 1
fi
cmake --build "$build" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
ctest --test-dir "$build" --output-on-failure
echo "ci_build_and_test: passed in $(( $(date +%s) - start )) s"
