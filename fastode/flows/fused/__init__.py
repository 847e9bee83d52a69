"""The fused CNF engines: two engines (:class:`FusedGridEngine`, :class:`FusedAdaptiveEngine`) over one backend
interface (:class:`FusedBackend`), implemented by a C++ backend (:class:`CppBackend`, CPU) and a Triton backend
(:class:`TritonBackend`, CUDA). The registry (:mod:`fastode.flows.engines`) holds four of them under the names
``"cpp_grid"``, ``"cpp_adaptive"``, ``"triton_grid"`` and ``"triton_adaptive"``; a third backend costs one class.

=========  ==============================================  ============================================
           C++                                             Triton
=========  ==============================================  ============================================
kernel     ``csrc/cnf_step.cpp``, ``cnf_grid.cpp``,          ``kernels/cnf_step.py``
           ``cnf_adaptive.cpp`` (with the solve loop)
launcher   ``csrc/bindings.cpp``, :mod:`fastode.cpp._ops`   ``kernels/cnf_solve.py``
Function   :mod:`fastode.cpp._rk`                          :mod:`fastode.triton._cnf`
backend    :mod:`.cpp`                                     :mod:`.triton` (+ its solve driver,
                                                           :mod:`.triton_solve`)
=========  ==============================================  ============================================
"""
from .base import AdaptivePlan, FusedBackend, FusedRun, GridPlan
from .cpp import CppBackend
from .engines import FusedAdaptiveEngine, FusedGridEngine
from .triton import TritonBackend

__all__ = ["FusedBackend", "FusedRun", "GridPlan", "AdaptivePlan", "FusedGridEngine", "FusedAdaptiveEngine",
           "CppBackend", "TritonBackend"]
