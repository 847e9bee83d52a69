"""What the solvers read on the host, made traceable by ``torch.compile``.

A fixed-grid solve needs its times as Python floats: they decide how many steps the loop runs and which outputs
each step produces. In eager mode that is a host read (``tolist``). Under ``torch.compile`` a host read is a graph
break, so the values are read once while tracing (``torch.compiler.assume_constant_result``) and become part of
the compiled graph; the graph then checks, on every call, that the tensor still holds them
(``torch._assert_async``), so a compiled solve called with other times raises instead of silently integrating the
old grid (recompile with ``torch._dynamo.reset()``, or compile one function per time grid).

Data-dependent checks that eager mode raises as fastode errors (a NaN state, a non-finite step) become in-graph
assertions with the same message under ``torch.compile`` (a ``RuntimeError``).
"""
from __future__ import annotations

from typing import Callable, List

import torch

__all__ = ["host_floats", "host_constant", "check", "constant_result"]


def constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without its import of ``torch._dynamo`` (over a second, which
    ``import fastode`` must not pay): that decorator only marks the function, as torch marks its own functions
    (``torch/_dynamo/decorators.py``); ``tests/test_import_time.py`` checks that the mark is still torch's."""
    fn._dynamo_marked_constant = True
    return fn

_CHANGED = ("fastode: a compiled solve read these times while it was traced and they changed since (under "
            "torch.compile the time values are part of the graph); call torch._dynamo.reset() to recompile, or "
            "keep the times fixed")


@constant_result
def _traced_floats(t: torch.Tensor) -> tuple:
    return tuple(t.detach().to("cpu", torch.float64).tolist())


def host_floats(t: torch.Tensor) -> List[float]:
    """``t``'s values as Python floats: a host read in eager mode, a traced constant guarded in-graph when
    compiling (see the module docstring)."""
    if not torch.compiler.is_compiling():
        return t.detach().to("cpu", torch.float64).tolist()
    vals = _traced_floats(t)
    ref = torch.tensor(vals, dtype=torch.float64, device=t.device)
    torch._assert_async(torch.all(t.detach().to(torch.float64) == ref), _CHANGED)
    return list(vals)


def host_constant(fn: Callable, *args):
    """``fn(*args)`` (a Python value computed from tensors) in eager mode; when compiling, computed once while
    tracing. Only for values determined by tensors that :func:`host_floats` guards (e.g. a step count from the
    times)."""
    if not torch.compiler.is_compiling():
        return fn(*args)
    return _traced_call(fn, *args)


@constant_result
def _traced_call(fn, *args):
    return fn(*args)


def check(ok: torch.Tensor, error: Callable[[], Exception]) -> None:
    """Raise ``error()`` unless the boolean tensor ``ok`` is true: a host read in eager mode; when compiling, an
    in-graph assertion carrying the error's message."""
    if not torch.compiler.is_compiling():
        if not bool(ok):
            raise error()
        return
    torch._assert_async(ok, str(error()))
