#!/usr/bin/env bash
# CI for the C++ backend (called by quickstart.sh test, i.e. .ci/run):
#   1. build the extension fastode._C in place (csrc/build_inplace.sh: skipped when the built module is newer
#      than every source file and imports), failing loudly instead of falling back to pure Python;
#   2. check that fastode.cpp loads it;
#   3. configure + build the torch-free core and its unit tests with CMake in build/cmake (incremental) and
#      run them with ctest (built-in GEMM, and libtorch's MKL).
# About one minute on an idle 2-core machine from scratch (the core's translation units compile in parallel, for
# the extension and again for ctest's torch-free library, plus bindings.cpp); an unchanged tree rebuilds nothing
# and a changed file recompiles only its objects (ninja for the extension, CMake for the core).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$(date +%s)

FASTODE_REQUIRE_EXT=1 PYTHON="$PY" bash csrc/build_inplace.sh
"$PY" - <<'PYEOF'
import sys
import fastode.cpp as c
info = c.build_info()
print("ci_build_and_test: fastode.cpp.build_info() =", info)
sys.exit(0 if info["available"] else 1)
PYEOF

build=build/cmake  # kept between runs, so that an unchanged tree rebuilds nothing
mkdir -p "$build"
# an absolute path (not resolved through symlinks: a venv's python is a link to its base interpreter), since
# CMake runs it from the build directory to find torch
py_abs=$(command -v "$PY")
case "$py_abs" in /*) ;; *) py_abs="$(cd "$(dirname "$py_abs")" && pwd)/$(basename "$py_abs")" ;; esac
if ! cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$py_abs" \
        > "$build/configure.log" 2>&1; then
    cat "$build/configure.log"
    exit 1
fi
cmake --build "$build" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
ctest --test-dir "$build" --output-on-failure
echo "ci_build_and_test: passed in $(( $(date +%s) - start )) s"
