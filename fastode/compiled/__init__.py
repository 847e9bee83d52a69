"""``odeint(..., compile=True)``: the whole solve of the user's own ``func`` as one program built by
``torch.compile``.

:mod:`~fastode.compiled.loop` and :mod:`~fastode.compiled.grid_loop` restate the eager solvers' loops with tensors
only (one ``while_loop``), :mod:`~fastode.compiled.adjoint` is their discrete adjoint (the exact gradient, a second
compiled loop), :mod:`~fastode.compiled.engine` builds, caches and runs the programs (:class:`CompiledOdeint`,
:func:`compiled_odeint`). Importing this package does not import ``torch._dynamo``; building a program does.
"""
import os

__all__ = ["compile_requested", "ENV"]

ENV = "FASTODE_COMPILE"


def compile_requested(compile) -> bool:
    """``odeint``'s ``compile`` keyword: True / False as given; ``None`` (the default) reads ``FASTODE_COMPILE``
    (``1``: compile every solve, falling back to the eager loop with a warning where it cannot)."""
    if compile is None:
        return os.environ.get(ENV, "0") not in ("0", "")
    return bool(compile)
