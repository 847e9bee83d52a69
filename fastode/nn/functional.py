"""The PyTorch reference of the concatsquash MLP (the executable spec), under its public name.

The spec lives in the ops layer, :mod:`fastode.ops.concatsquash`, below the solvers and the C++ / Triton
backends that are tested against it; this module re-exports it.
"""
from ..ops.concatsquash import *  # noqa: F401,F403
from ..ops.concatsquash import __all__, _as_time, _forward  # noqa: F401
