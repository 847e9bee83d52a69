"""One registry of op implementations ("backends"), keyed by op name and backend name, with written rules.

An *op* is a named computation with one reference implementation (plain PyTorch, differentiable, any device:
the executable specification) and any number of faster backends. A backend registers, per op, an
implementation, the device types it runs on, and optionally ``supports(*args) -> None | str`` (``None``: can
run this call; a string: why not, e.g. a width the kernel cannot tile). Optional backends register lazily: the
module that holds them is imported the first time they are asked for, and registers itself on import.

Rules (tested in ``tests/test_ops_registry.py``):

1. ``backend="auto"`` tries the op's automatic candidates for the device type in their written order (see
   :data:`AUTO_ORDER`) and takes the first that is registered, importable, runs on the device and supports the
   call; every candidate it skipped is recorded with its reason in the returned :class:`Choice` (``skipped``).
   The reference ("torch") is always last, so automatic choice never fails.
2. An explicitly named backend that cannot run the call raises :class:`BackendUnavailableError` (a
   ``ValueError``) saying which backend, which op and why; it never falls back silently.
3. Resolution is meant to happen once per solve (or per module call), not per stage: callers keep the
   :class:`Choice` and call ``choice.impl`` directly. Nothing here is consulted inside a solver's stage loop.

This module imports nothing from fastode but :mod:`fastode.compiling` (torch only): it is the bottom layer.
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from ..compiling import constant_result

__all__ = ["Choice", "BackendUnavailableError", "register", "register_lazy", "resolve", "backends_of",
           "AUTO_ORDER", "REFERENCE", "snapshot", "restore", "lookup"]

REFERENCE = "torch"
"""Name of the reference backend every op has."""

AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", REFERENCE),
    "cpu": ("cpp", REFERENCE),
}
"""Automatic candidates per device type, best first (other device types: the reference only). An op may
override the order for itself (``register(..., auto=...)``), e.g. the RK stage ops keep the reference first
on the CPU, where it reproduces torchdiffeq's rounding."""


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run the call (what was asked, and why it cannot)."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    devices: object          # tuple of device types, or a callable returning one (read at each resolution)
    supports: Optional[Callable[..., Optional[str]]]
    hint: Optional[str]      # what to do when the device type does not match


@dataclass
class Choice:
    """The outcome of :func:`resolve`: the backend's name, its implementation, and what was passed over."""

    op: str
    backend: str
    impl: Callable
    skipped: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)   # (backend, reason) in order

    @property
    def reason(self) -> Optional[str]:
        """Why the better candidates were not taken ("triton: ...; cpp: ..."), or None if none was skipped."""
        if not self.skipped:
            return None
        return "; ".join(f"{name}: {why}" for name, why in self.skipped)


_lock = threading.RLock()
_impls: Dict[str, Dict[str, _Impl]] = {}          # op -> backend -> implementation
_auto: Dict[str, Dict[str, Tuple[str, ...]]] = {}  # op -> device type -> candidate order
_lazy: Dict[str, list] = {}                        # backend -> modules that register it on import
_import_errors: Dict[str, str] = {}                # module -> why importing it failed


def register(op: str, backend: str, fn: Callable, *, devices=("cpu", "cuda"), supports=None,
             auto: Optional[Dict[str, Tuple[str, ...]]] = None, hint: Optional[str] = None) -> None:
    """Register ``fn`` as backend ``backend`` of ``op`` on the device types ``devices`` (``"*"``: any; or a
    callable returning them, for backends whose devices depend on the process, e.g. Triton's interpreter).

    ``auto`` (given with the reference registration) overrides :data:`AUTO_ORDER` for this op; ``hint`` is added
    to the reason when the device type does not match."""
    with _lock:
        _impls.setdefault(op, {})[backend] = _Impl(fn, devices if callable(devices) else tuple(devices), supports,
                                                   hint)
        if auto is not None:
            _auto[op] = dict(auto)


def register_lazy(backend: str, module: str) -> None:
    """Import ``module`` the first time backend ``backend`` is needed; the import must :func:`register` it.
    A backend may have several such modules (one per family of ops, e.g. Triton's RK and MLP ops)."""
    with _lock:
        mods = _lazy.setdefault(backend, [])
        if module not in mods:
            mods.append(module)


def _load(op: str, backend: str) -> Tuple[Optional[_Impl], Optional[str]]:
    impl = _impls.get(op, {}).get(backend)   # the common case, without the lock (dict reads are atomic)
    if impl is not None:
        return impl, None
    with _lock:
        impl = _impls.get(op, {}).get(backend)
        if impl is not None:
            return impl, None
        modules = _lazy.get(backend)
        if not modules:
            return None, "not registered"
        for module in modules:          # each is imported at most once; a failure is remembered
            if module not in _import_errors:
                try:
                    importlib.import_module(module)
                except Exception as exc:  # optional backends: absence is a recorded reason, not an error
                    _import_errors[module] = f"importing {module} failed ({type(exc).__name__}: {exc})"
            impl = _impls.get(op, {}).get(backend)
            if impl is not None:
                return impl, None
        errors = [_import_errors[m] for m in modules if m in _import_errors]
        return None, "; ".join(errors) or f"{', '.join(modules)} did not register op {op!r} (not built?)"


def snapshot():
    """The registry's state, for :func:`restore` (tests that register throw-away backends)."""
    with _lock:
        return ({op: dict(b) for op, b in _impls.items()}, {op: dict(a) for op, a in _auto.items()},
                {b: list(m) for b, m in _lazy.items()}, dict(_import_errors))


def restore(state) -> None:
    with _lock:
        for live, saved in zip((_impls, _auto, _lazy, _import_errors), state):
            live.clear()
            live.update(saved)


def lookup(op: str, backend: str) -> Callable:
    """The registered implementation of ``op`` by ``backend``, without checks (KeyError if there is none): for a
    caller that resolved a sibling op of the same backend and wants the rest of its family."""
    impl, why = _load(op, backend)
    if impl is None:
        raise KeyError(f"backend {backend!r} has no op {op!r}: {why}")
    return impl.fn


def backends_of(op: str) -> Tuple[str, ...]:
    """Names registered (or registrable lazily) for ``op``."""
    with _lock:
        return tuple(sorted(set(_impls.get(op, {})) | set(_lazy)))


def _why_not(op: str, backend: str, device_type: str, call) -> Tuple[Optional[_Impl], Optional[str]]:
    why = _why_not_here(op, backend, device_type)
    if why is not None:
        return None, why
    return _why_not_call(_impls[op][backend], call)


def _why_not_here(op: str, backend: str, device_type: str) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``device_type`` at all (not loadable, other devices), or None."""
    impl, why = _load(op, backend)
    if impl is None:
        return why
    devices = impl.devices() if callable(impl.devices) else impl.devices
    if "*" not in devices and device_type not in devices:
        return f"runs on {'/'.join(devices)} tensors, not {device_type}" + (f"; {impl.hint}" if impl.hint else "")
    return None


def _why_not_call(impl: _Impl, call) -> Tuple[Optional[_Impl], Optional[str]]:
    if impl.supports is not None and call is not None:
        why = impl.supports(*call)
        if why is not None:
            return None, why
    return impl, None


@constant_result
def _plan_traced(op: str, backend: str, device_type: str) -> tuple:
    """``((name, why or None), ...)``: the candidates in order, each loaded (or not) and checked for the device.
    Run while tracing, before the traced code reads the registry, so that what it loads is seen there."""
    if op not in _impls or REFERENCE not in _impls[op]:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_impls)}")
    names = (backend,) if backend != "auto" else _auto.get(op, AUTO_ORDER).get(device_type, (REFERENCE,))
    return tuple((name, _why_not_here(op, name, device_type)) for name in names)


def _resolve_compiled(op: str, backend: str, device_type: str, call: Optional[tuple]) -> Choice:
    skipped = []
    for name, why in _plan_traced(op, backend, device_type):
        impl = None
        if why is None:
            impl, why = _why_not_call(_impls[op][name], call)
        if impl is not None:
            return Choice(op, name, impl.fn, tuple(skipped))
        if backend != "auto":
            raise BackendUnavailableError(f"backend {backend!r} cannot run {op} on {device_type} tensors: {why}")
        skipped.append((name, why))
    return Choice(op, REFERENCE, _impls[op][REFERENCE].fn, tuple(skipped))


def resolve(op: str, backend: str = "auto", *, device_type: str = "cpu", call: Optional[tuple] = None) -> Choice:
    """The implementation of ``op`` that ``backend`` means for tensors on ``device_type`` (rules in the module
    docstring). ``call``: the arguments, for the backends' ``supports`` checks (None: skip those checks).

    Under ``torch.compile`` whether a backend is loaded and runs on the device (a lock, perhaps a lazy import) is
    decided while tracing and enters the graph as a constant (the registry only grows, so it stays valid); the
    ``supports`` checks read only tensor metadata and are traced."""
    if torch.compiler.is_compiling():
        return _resolve_compiled(op, backend, device_type, call)
    return _resolve(op, backend, device_type, call)


def _resolve(op: str, backend: str, device_type: str, call: Optional[tuple]) -> Choice:
    if op not in _impls or REFERENCE not in _impls[op]:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_impls)}")
    if backend != "auto":
        impl, why = _why_not(op, backend, device_type, call)
        if impl is None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {op} on {device_type} tensors: {why}. "
                                          f"Use backend='auto' to let fastode choose (available for {op}: "
                                          f"{', '.join(backends_of(op))})")
        return Choice(op, backend, impl.fn)
    order = _auto.get(op, AUTO_ORDER).get(device_type, (REFERENCE,))
    skipped = []
    for name in order:
        impl, why = _why_not(op, name, device_type, call)
        if impl is not None:
            return Choice(op, name, impl.fn, tuple(skipped))
        skipped.append((name, why))
    return Choice(op, REFERENCE, _impls[op][REFERENCE].fn, tuple(skipped))
