"""The Triton backend of fastode: the autograd Functions over the Triton kernels (``kernels/``, shipped as
``fastode.kernels``), laid out as the C++ backend :mod:`fastode.cpp` is:

* :mod:`fastode.triton._mlp` -- backend ``"triton"`` of the concatsquash-MLP ops (:mod:`fastode.ops.mlp`), and the
  same kernels as ``torch.library`` custom ops (what compiled graphs call); C++: :mod:`fastode.cpp._mlp`;
* :mod:`fastode.triton._rk` -- backend ``"triton"`` of the RK ops ``rk.combine`` / ``rk.error_ratio``
  (:mod:`fastode.ops.rk`), and their custom ops;
* :mod:`fastode.triton._cnf` -- the fused CNF solves' autograd Function (the tape and the fused discrete adjoint);
  C++: :mod:`fastode.cpp._rk`. The solve driver that runs them is the Triton backend of the fused CNF engines
  (:mod:`fastode.flows.fused.triton`).

Nothing is imported here: the modules need Triton, which is optional, and the ops registry imports them lazily by
name (an import that fails makes the backend unavailable and ``"auto"`` fall back).
"""
