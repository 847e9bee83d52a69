"""Where the Triton kernel tests run: compiled on CUDA (mark ``gpu``) or in the CPU interpreter (mark
``interpret``; see conftest.py). Kernel test modules do ``from _kernels_env import *`` at the top."""
import contextlib
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is optional
    HAS_TRITON = False

if INTERPRET:
    KDEV, KMARK = "cpu", pytest.mark.interpret
elif HAS_CUDA:
    KDEV, KMARK = "cuda", pytest.mark.gpu
else:
    KDEV, KMARK = None, pytest.mark.interpret

SKIP_REASON = (None if HAS_TRITON and KDEV is not None
               else "Triton kernels need triton and either CUDA or TRITON_INTERPRET=1 set before import")

# tiny tiles under the interpreter (cost ~ number of programs x ops); GPU uses the defaults
SMALL = dict(BM=16, CH=16, max_programs=2) if INTERPRET else dict(BM=None, CH=None, max_programs=None)



@contextlib.contextmanager
def small_poisoned_mlp_kernels():
    """The Triton MLP backend with the SMALL launch settings, outputs and scratch NaN-poisoned before the kernels
    write them, and an empty parameter cache; restored afterwards."""
    from fastode.kernels import _common as KC
    from fastode.triton import _mlp as TB

    old = dict(TB.CONFIG)
    TB.configure(**SMALL)
    KC.set_poison(True)
    TB.clear_cache()
    try:
        yield TB
    finally:
        KC.set_poison(False)
        TB.configure(**old)


__all__ = ["INTERPRET", "HAS_CUDA", "HAS_TRITON", "KDEV", "KMARK", "SKIP_REASON", "SMALL",
           "small_poisoned_mlp_kernels"]
