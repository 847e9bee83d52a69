"""The concatsquash MLP ops on the ops registry: the reference (:mod:`fastode.ops.concatsquash`), the backends,
the user's backend preference, and a binding that fixes the choice for a whole solve.

Ops (each backend registers all four; ``call`` for ``supports`` is always ``(t, z, params, activation)``):

* ``mlp.forward(t, z, params, activation) -> f``
* ``mlp.hutchinson(t, z, e, params, activation) -> (f, vjp, trace, kinetic, jac_frob)``
* ``mlp.exact_trace(t, z, params, activation) -> (f, trace)``
* ``mlp.bind(params, activation, like) -> BoundMLP``: the three functions with the parameters, the activation
  and the backend fixed, for a caller that evaluates the same network many times (a solve's stages). Inputs are
  checked once, at binding; a backend may precompute what it can (flattened parameters, tiles, activation codes)
  and skip autograd bookkeeping when no gradient is wanted.

Backends: ``"torch"`` (the reference, any device), ``"cpp"`` (:mod:`fastode.cpp`, CPU, registered when the
extension is built), ``"triton"`` (:mod:`fastode.triton._mlp`, CUDA or the interpreter). Automatic choice
follows :data:`fastode.ops.registry.AUTO_ORDER` (cpp then torch on the CPU, triton then torch on CUDA).

Preference: ``backend="auto"`` first defers to the user's global choice (:func:`set_preference`,
:func:`use_preference`, or ``FASTODE_NN_BACKEND``), which then acts as an explicit choice (it raises when it
cannot run the call). :mod:`fastode.nn.backends` exposes this under its public names (``set_backend`` ...).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, NamedTuple, Optional, Tuple

from . import concatsquash as spec
from . import registry

__all__ = ["OPS", "BoundMLP", "MLPBackend", "bind_generic", "register_backend", "resolve", "bind",
           "check_name", "set_preference", "get_preference", "use_preference"]

OPS = ("mlp.forward", "mlp.hutchinson", "mlp.exact_trace", "mlp.bind")
_FUNCTIONS = ("concatsquash_mlp", "concatsquash_mlp_hutchinson", "concatsquash_mlp_exact_trace")


class BoundMLP(NamedTuple):
    """The MLP's functions for one solve: ``forward(t, z)``, ``hutchinson(t, z, e)``, ``exact_trace(t, z)``
    (outputs as the ops'), on ``backend``. Valid while the parameters are the same tensors (in-place updates,
    as optimisers make, are seen; replacing a parameter object is not)."""

    backend: str
    forward: Callable
    hutchinson: Callable
    exact_trace: Callable


class MLPBackend(NamedTuple):
    """The resolved backend of one call: its name, the three functions, and what automatic choice passed over."""

    name: str
    concatsquash_mlp: Callable
    concatsquash_mlp_hutchinson: Callable
    concatsquash_mlp_exact_trace: Callable
    skipped: Tuple[Tuple[str, str], ...] = ()


def bind_generic(name: str, module) -> Callable:
    """``mlp.bind`` for a backend that has only the three functions: closures over them (each call still checks)."""

    def bind_(params, activation, like):
        return BoundMLP(name,
                        lambda t, z: module.concatsquash_mlp(t, z, params, activation),
                        lambda t, z, e: module.concatsquash_mlp_hutchinson(t, z, e, params, activation),
                        lambda t, z: module.concatsquash_mlp_exact_trace(t, z, params, activation))
    return bind_


def register_backend(name: str, module, devices=("cpu", "cuda"), hint: Optional[str] = None) -> None:
    """Register ``module`` (the three concatsquash functions, optionally ``supports(t, z, params, activation)``
    and ``bind(params, activation, like)``) as MLP backend ``name`` on the device types ``devices`` (see
    :func:`fastode.ops.registry.register`)."""
    missing = [f for f in _FUNCTIONS if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(f"backend {name!r} lacks {missing}; a backend must define {list(_FUNCTIONS)}")
    supports = getattr(module, "supports", None)
    supports = supports if callable(supports) else None
    fns = [getattr(module, f) for f in _FUNCTIONS]
    bind_ = getattr(module, "bind", None)
    fns.append(bind_ if callable(bind_) else bind_generic(name, module))
    for op, fn in zip(OPS, fns):
        registry.register(op, name, fn, devices=devices, supports=supports, hint=hint)
    _families[name] = MLPBackend(name, *fns[:3])  # built here, not on first use: a compiled graph guards on it


_families: dict = {}   # backend name -> MLPBackend (its three functions), so that a call resolves one op, not three


def _family(name: str, forward: Callable) -> MLPBackend:
    fam = _families.get(name)
    if fam is None or fam.concatsquash_mlp is not forward:   # (new, or registered again through the registry)
        fam = _families[name] = MLPBackend(name, forward, registry.lookup(OPS[1], name),
                                           registry.lookup(OPS[2], name))
    return fam


register_backend(registry.REFERENCE, spec, devices=("*",))
registry.register_lazy("triton", "fastode.triton._mlp")
registry.register_lazy("cpp", "fastode.cpp")


# ------------------------------------------------------------------------------------------ preference
_preference: Optional[str] = None


def check_name(name) -> str:
    """``name`` lower-cased if it is ``"auto"`` or a known MLP backend, else a ValueError listing them."""
    if name == "auto":
        return name
    if not isinstance(name, str):
        raise ValueError(f"backend must be a string, got {type(name).__name__}")
    name = name.lower()
    known = registry.backends_of(OPS[0])
    if name != "auto" and name not in known:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {sorted(known)}")
    return name


def set_preference(name: Optional[str]) -> None:
    """The backend used wherever ``"auto"`` is asked for (``None`` or ``"auto"`` resets it)."""
    global _preference
    name = None if name is None else check_name(name)
    _preference = None if name == "auto" else name


def get_preference() -> str:
    """The global choice (:func:`set_preference`, else ``FASTODE_NN_BACKEND``), or ``"auto"``."""
    if _preference is not None:
        return _preference
    env = os.environ.get("FASTODE_NN_BACKEND", "").strip()
    return check_name(env) if env else "auto"


@contextlib.contextmanager
def use_preference(name: Optional[str]):
    """Temporarily :func:`set_preference` ``name``."""
    global _preference
    old = _preference
    set_preference(name)
    try:
        yield
    finally:
        _preference = old


# ------------------------------------------------------------------------------------------ resolution
def resolve(backend: str = "auto", device_type: str = "cpu", call: Optional[tuple] = None) -> MLPBackend:
    """The MLP backend ``backend`` means for a call on ``device_type`` (``call = (t, z, params, activation)``, for
    the backends' ``supports``; None skips those checks). Explicit names (and the preference) raise
    :class:`~fastode.ops.registry.BackendUnavailableError` when they cannot run it."""
    name = check_name(backend or "auto")
    if name == "auto":
        name = get_preference()
    choice = registry.resolve(OPS[0], name, device_type=device_type, call=call)
    fam = _family(choice.backend, choice.impl)
    return fam._replace(skipped=choice.skipped) if choice.skipped else fam


def bind(params, activation: str, like, backend: str = "auto") -> BoundMLP:
    """A :class:`BoundMLP` of the network ``params`` for inputs like ``like`` (checked here, once)."""
    t0 = spec._as_time(0.0, like)
    spec.check_inputs(t0, like, params, activation)
    chosen = resolve(backend, like.device.type, (t0, like, params, activation))
    return registry.lookup("mlp.bind", chosen.name)(params, activation, like)
