"""fastode: fused, exact-gradient Runge-Kutta solvers for neural ODEs and CNFs (a drop-in for torchdiffeq)."""
__version__ = "0.1.0"

from .odeint import odeint, odeint_dense, odeint_event  # noqa: E402
from .stats import SolveStats  # noqa: E402
from . import errors  # noqa: E402

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "compiled_odeint", "SolveStats", "errors",
           "__version__"]


def __getattr__(name):
    # odeint_adjoint lives in fastode.grad.adjoint (imported lazily so that a problem there never breaks odeint)
    if name == "odeint_adjoint":
        from .grad.adjoint import odeint_adjoint
        return odeint_adjoint
    if name == "compiled_odeint":   # imports torch._dynamo: only when asked for
        from .compiled.engine import compiled_odeint
        return compiled_odeint
    raise AttributeError(f"module 'fastode' has no attribute {name!r}")
