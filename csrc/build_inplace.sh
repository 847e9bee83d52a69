#!/usr/bin/env bash
# Build the C++ extension fastode._C in place, only when it is missing, does not import, or is older than
# a source under csrc/ (the unit tests in csrc/tests/ excepted) or setup.py: an unchanged tree rebuilds nothing,
# and ninja recompiles only the translation units that changed. Says what it does either way.
# FASTODE_REQUIRE_EXT=1 makes a failed build an error; otherwise fastode falls back to the PyTorch
# reference on the CPU (fastode.cpp.build_info() says which backend is active).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

so=$(ls fastode/_C*.so 2>/dev/null | head -n 1 || true)
newer=""
if [ -n "$so" ]; then
    newer=$(find csrc setup.py -path csrc/tests -prune -o -newer "$so" \( -name '*.cpp' -o -name '*.h' -o -name setup.py \) -print -quit)
fi
if [ -n "$so" ] && [ -z "$newer" ] && "$PY" -c "import torch, fastode._C" 2>/dev/null; then
    echo "build_inplace: $so is up to date (no source under csrc/ changed): not rebuilding"
    exit 0
fi
if [ -z "$so" ]; then
    why="no built extension yet"
elif [ -n "$newer" ]; then
    why="$newer changed"
else
    why="$so does not import with this torch"
fi
start=$(date +%s)
echo "build_inplace: building the C++ extension fastode._C ($why); about a minute on 2 cores..."
if "$PY" setup.py -q build_ext --inplace; then
    echo "build_inplace: built in $(( $(date +%s) - start )) s"
elif [ "${FASTODE_REQUIRE_EXT:-0}" != 0 ]; then
    echo "build_inplace: the build failed (FASTODE_REQUIRE_EXT is set)" >&2
    exit 1
else
    echo "build_inplace: the build failed; fastode will use the PyTorch reference on the CPU" >&2
fi
