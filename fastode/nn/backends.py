"""Backends of the concatsquash MLP functions, under their public names (the registry is the ops layer's).

A backend is any object (usually a module) with the three functions of :mod:`fastode.nn.functional`::

    concatsquash_mlp(t, z, params, activation) -> f
    concatsquash_mlp_hutchinson(t, z, e, params, activation) -> (f, vjp, trace, kinetic, jac_frob)
    concatsquash_mlp_exact_trace(t, z, params, activation) -> (f, trace)

all differentiable by autograd, optionally ``supports(t, z, params, activation) -> str | None`` (``None`` =
supported, a string = why not) and ``bind(params, activation, like)`` (see :mod:`fastode.ops.mlp`). Backends
that cannot serve a call are skipped by ``"auto"`` and rejected with the reason when asked for by name.

Built-in names: ``"torch"`` (the reference, any device), ``"triton"`` (:mod:`fastode.triton._mlp`, CUDA, or
CPU tensors under ``TRITON_INTERPRET=1``), ``"cpp"`` (:mod:`fastode.cpp`, registered on import when the C++
extension is built). Optional backends are imported the first time they are asked for.

Selection: an explicit name (per module or per call) wins; ``"auto"`` defers to the global override
(:func:`set_backend`, :func:`use_backend`, ``FASTODE_NN_BACKEND``), and if that is unset the rule of
:mod:`fastode.ops.registry`: ``"triton"`` for CUDA tensors, ``"cpp"`` for CPU tensors, else ``"torch"``.
:func:`resolve_backend_name` says which backend a call resolves to; a module records the one its own latest call
used (``ConcatSquashMLP.last_backend``), a CNF solve in its record (``CNF.last_solve.mlp_backend``).
"""
from __future__ import annotations

import torch

from ..ops import mlp as _mlp
from ..ops import registry as _registry

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
]

set_backend = _mlp.set_preference
get_global_backend = _mlp.get_preference
use_backend = _mlp.use_preference
_check_name = _mlp.check_name


def register_backend(name: str, module) -> None:
    """Register ``module`` (anything with the three concatsquash functions) under ``name``, on any device its
    ``supports`` accepts."""
    _mlp.register_backend(name, module, devices=("*",))


def register_lazy_backend(name: str, module_path: str) -> None:
    """Import ``module_path`` the first time backend ``name`` is needed; the import must register it."""
    _registry.register_lazy(name, module_path)


def available_backends() -> list[str]:
    """Names of the backends that can be loaded in this process."""
    return sorted(n for n in _registry.backends_of(_mlp.OPS[0]) if _registry._load(_mlp.OPS[0], n)[0] is not None)


def resolve_backend_name(name: str = "auto", device=None, call=None) -> str:
    """Name of the backend ``name`` resolves to for tensors on ``device``.

    ``call`` is an optional ``(t, z, params, activation)`` tuple used to ask backends whether they support this
    particular call. Raises ValueError if an explicitly named backend cannot serve it.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _mlp.resolve(name or "auto", device.type, call).name


def select_backend(name: str = "auto", t=None, z=None, params=None, activation=None):
    """``(name, backend)`` for a concatsquash call on ``z``."""
    call = None if z is None else (t, z, params, activation)
    chosen = _mlp.resolve(name or "auto", z.device.type if z is not None else "cpu", call)
    return chosen.name, chosen


def get_backend(name: str = "auto", device=None):
    """The backend (its three functions) ``name`` resolves to for tensors on ``device``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _mlp.resolve(name or "auto", device.type)
