"""The ops layer, below everything else in fastode: each op's reference implementation (the executable spec)
and a registry of faster backends with written fallback rules.

* :mod:`fastode.ops.registry` -- register / resolve backends per op and device (the rules);
* :mod:`fastode.ops.rk` -- the RK step spec (stage times, stage combination, embedded error, error ratio,
  initial step) and the ops ``rk.combine`` / ``rk.error_ratio``;
* :mod:`fastode.ops.concatsquash` -- the concatsquash MLP spec (forward, Hutchinson VJP, exact trace);
* :mod:`fastode.ops.mlp` -- the MLP ops ``mlp.forward`` / ``mlp.hutchinson`` / ``mlp.exact_trace`` / ``mlp.bind``,
  their backends ("torch"; "cpp" from :mod:`fastode.cpp`; "triton") and the user's backend preference;
* the fused Triton Functions (backend "triton" of these ops: :mod:`fastode.triton._rk`, :mod:`fastode.triton._mlp`;
  CUDA or the interpreter), imported lazily;
* :mod:`fastode.ops.reference_grad` -- double backward of fused Functions through the reference.

Nothing here imports the solvers, the models, the flows or (except lazily, by name) the C++ package.
"""
from . import concatsquash, mlp, registry, rk
from .registry import BackendUnavailableError, Choice, resolve

__all__ = ["registry", "rk", "concatsquash", "mlp", "resolve", "Choice", "BackendUnavailableError"]
