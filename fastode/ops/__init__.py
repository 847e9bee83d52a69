"""The ops layer, below everything else in fastode: each op's reference implementation (the executable spec)
and a registry of faster backends with written fallback rules.

* :mod:`fastode.ops.registry` -- register / resolve backends per op and device (the rules);
* :mod:`fastode.ops.rk` -- the RK step spec (stage times, stage combination, embedded error, error ratio,
  initial step) and the ops ``rk.combine`` / ``rk.error_ratio``;
* :mod:`fastode.ops.triton_rk` -- the fused Triton RK Functions (backend "triton", CUDA), imported lazily;
* :mod:`fastode.ops.reference_grad` -- double backward of fused Functions through the reference.

The concatsquash MLP ops (spec :mod:`fastode.nn.functional`, backends "torch", "triton", "cpp") still have their
own registry, :mod:`fastode.nn.backends`, with the same rules; moving them onto this one is the next step. Nothing
here imports the solvers, the models or the flows.
"""
from . import registry, rk
from .registry import BackendUnavailableError, Choice, resolve

__all__ = ["registry", "rk", "resolve", "Choice", "BackendUnavailableError"]
