"""Loads the compiled extension ``fastode._C`` if it was built; never raises."""
from __future__ import annotations

import importlib

_ext = None
_error: str | None = None


def _load():
    global _ext, _error
    try:
        import torch  # noqa: F401  (libtorch must be loaded before the extension)

        _ext = importlib.import_module("fastode._C")
    except ImportError as exc:
        _error = (f"the C++ extension fastode._C is not built ({exc}); reinstall with "
                  "`pip install --no-build-isolation -e .` and a C++ compiler to build it")
    except Exception as exc:  # a broken build must not break `import fastode`
        _error = f"loading the C++ extension fastode._C failed: {type(exc).__name__}: {exc}"


_load()


def ext():
    """The extension module, or raise RuntimeError saying why it is unavailable."""
    if _ext is None:
        raise RuntimeError(_error)
    return _ext


def available() -> bool:
    """True when the C++ extension is built and loaded."""
    return _ext is not None


def build_info() -> dict:
    """What the C++ backend is: ``available``, ``error`` (why not), ``path``, ``openmp``, ``gemm``
    (``"blas"`` = the BLAS inside libtorch, ``"fallback"`` = built-in loops; prefixed ``"avx512+"`` when the
    AVX-512 micro-kernels run the wide float32 tanh/identity layers), ``tile`` / ``tile_large`` (rows per tile
    for small / large batches). ``FASTODE_GEMM=blas`` or
    ``fallback`` (read at load) turns the micro-kernels off, ``fallback`` also BLAS."""
    from ._dispatch import tile_rows

    if _ext is None:
        return {"available": False, "error": _error}
    return {
        "available": True,
        "error": None,
        "path": getattr(_ext, "__file__", None),
        "openmp": bool(getattr(_ext, "openmp", False)),
        "gemm": _ext.gemm_backend(),
        "tile": tile_rows(),  # rows per tile for small batches
        "tile_large": tile_rows(1 << 20),  # and for large ones
    }
