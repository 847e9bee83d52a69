"""Backend registry of the concatsquash MLP functions.

A backend is any object (usually a module) with the three functions of :mod:`fastode.nn.functional`::

    concatsquash_mlp(t, z, params, activation) -> f
    concatsquash_mlp_hutchinson(t, z, e, params, activation) -> (f, vjp, trace, kinetic, jac_frob)
    concatsquash_mlp_exact_trace(t, z, params, activation) -> (f, trace)

all differentiable by autograd, and optionally ``supports(t, z, params, activation) -> str | None``
(``None`` = supported, a string = why not; e.g. a width the kernel cannot handle). Backends that are not
supported for a call are skipped by ``"auto"`` and rejected with that reason when asked for by name.

Built-in names:

* ``"torch"``: :mod:`fastode.nn.functional`, always available, any device.
* ``"triton"``: :mod:`fastode.nn.triton_backend`, imported lazily; CUDA tensors (or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before Triton was imported).
* ``"cpp"``: imported lazily from ``fastode.cpp``. That module registers itself by calling
  ``register_backend("cpp", impl)`` at import time when the C++ extension is built; if it does not (or
  the import fails) the backend is unavailable and ``"auto"`` falls back to ``"torch"``.

Selection (:func:`select_backend`): an explicit name (per module or per call) wins; ``"auto"`` defers to
the global override (:func:`set_backend`, :func:`use_backend`, or the environment variable
``FASTODE_NN_BACKEND``), and if that is unset or ``"auto"`` the rule is: ``"triton"`` for CUDA tensors
when Triton is importable, ``"cpp"`` for CPU tensors when the C++ extension is built, otherwise
``"torch"``. The name chosen by the latest selection is in :data:`last_backend`.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading

import torch

from . import functional as _functional

__all__ = [
    "register_backend",
    "register_lazy_backend",
    "available_backends",
    "get_backend",
    "select_backend",
    "resolve_backend_name",
    "set_backend",
    "get_global_backend",
    "use_backend",
    "last_backend",
]

_REQUIRED = ("concatsquash_mlp", "concatsquash_mlp_hutchinson", "concatsquash_mlp_exact_trace")

_backends: dict[str, object] = {"torch": _functional}
_lazy: dict[str, str] = {"triton": "fastode.nn.triton_backend", "cpp": "fastode.cpp"}
_import_errors: dict[str, str] = {}
_lock = threading.RLock()
_global_override: str | None = None

last_backend: str | None = None
"""Name of the backend chosen by the most recent :func:`select_backend` / :func:`get_backend` call."""


def register_backend(name: str, module) -> None:
    """Register ``module`` (anything with the three concatsquash functions) under ``name``."""
    missing = [f for f in _REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(f"backend {name!r} lacks {missing}; a backend must define {list(_REQUIRED)}")
    with _lock:
        _backends[name] = module
        _import_errors.pop(name, None)


def register_lazy_backend(name: str, module_path: str) -> None:
    """Import ``module_path`` the first time backend ``name`` is needed; the import must register it."""
    with _lock:
        _lazy[name] = module_path


def _load(name: str):
    """The backend registered as ``name`` (importing it lazily), or None if unavailable."""
    with _lock:
        if name in _backends:
            return _backends[name]
        path = _lazy.get(name)
        if path is None or name in _import_errors:
            return None
        try:
            importlib.import_module(path)
        except Exception as exc:  # optional backends: absence means fallback
            _import_errors[name] = f"importing {path} failed: {type(exc).__name__}: {exc}"
            return None
        if name not in _backends:
            _import_errors[name] = f"{path} was imported but did not register backend {name!r} (not built?)"
            return None
        return _backends[name]


def available_backends() -> list[str]:
    """Names of the backends that can be loaded in this process."""
    names = set(_backends) | set(_lazy)
    return sorted(n for n in names if _load(n) is not None)


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"backend must be a string, got {type(name).__name__}")
    name = name.lower()
    if name != "auto" and name not in _backends and name not in _lazy:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {sorted(set(_backends) | set(_lazy))}")
    return name


def set_backend(name: str | None) -> None:
    """Set the global backend used wherever ``"auto"`` is asked for (``None`` or ``"auto"`` resets it)."""
    global _global_override
    _global_override = None if name is None else _check_name(name)
    if _global_override == "auto":
        _global_override = None


def get_global_backend() -> str:
    """The global override (:func:`set_backend`, else ``FASTODE_NN_BACKEND``), or ``"auto"``."""
    if _global_override is not None:
        return _global_override
    env = os.environ.get("FASTODE_NN_BACKEND", "").strip()
    return _check_name(env) if env else "auto"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager: temporarily :func:`set_backend` ``name``."""
    global _global_override
    old = _global_override
    set_backend(name)
    try:
        yield
    finally:
        _global_override = old


def _triton_device_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _auto_candidates(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["triton", "torch"]
    if device.type == "cpu":
        return ["cpp", "torch"]
    return ["torch"]


def _unsupported_reason(name: str, module, device: torch.device, call) -> str | None:
    if name == "triton" and not _triton_device_ok(device):
        return f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run them on the CPU"
    supports = getattr(module, "supports", None)
    if call is not None and callable(supports):
        return supports(*call)
    return None


def resolve_backend_name(name: str = "auto", device=None, call=None) -> str:
    """Name of the backend ``name`` resolves to for tensors on ``device``.

    ``call`` is an optional ``(t, z, params, activation)`` tuple used to ask backends whether they
    support this particular call. Raises ValueError if an explicitly named backend cannot serve it.
    """
    name = _check_name(name or "auto")
    if name == "auto":
        name = get_global_backend()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if name != "auto":
        module = _load(name)
        if module is None:
            raise ValueError(f"backend {name!r} is not available: {_import_errors.get(name, 'not registered')}")
        reason = _unsupported_reason(name, module, device, call)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return name
    for cand in _auto_candidates(device):
        module = _load(cand)
        if module is not None and _unsupported_reason(cand, module, device, call) is None:
            return cand
    return "torch"


def select_backend(name: str = "auto", t=None, z=None, params=None, activation=None):
    """``(name, backend)`` for a concatsquash call on ``z``; records :data:`last_backend`."""
    global last_backend
    call = None if z is None else (t, z, params, activation)
    device = z.device if z is not None else None
    chosen = resolve_backend_name(name, device, call)
    last_backend = chosen
    return chosen, _backends[chosen]


def get_backend(name: str = "auto", device=None):
    """The backend module ``name`` resolves to for tensors on ``device``; records :data:`last_backend`."""
    global last_backend
    chosen = resolve_backend_name(name, device)
    last_backend = chosen
    return _backends[chosen]
