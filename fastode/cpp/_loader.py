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


def error() -> str | None:
    """Why the extension is unavailable (None when it is loaded)."""
    return _error
