"""The C++ CPU backend of fastode (extension ``fastode._C``, built from ``csrc/`` by setup.py).

Importing this package never fails: when the extension is missing (no compiler at install time, or
``FASTODE_NO_EXT=1``) :func:`available` is False, :func:`build_info` says why, and every function here
runs its PyTorch reference instead.

What it provides

* Backend ``"cpp"`` of the concatsquash-MLP ops (:mod:`fastode.ops.mlp`): the three functions
  of :mod:`fastode.ops.concatsquash` (and ``mlp.bind``) as autograd Functions over fused C++ kernels (forward, forward +
  probe VJPs, and one backward pass for all of it, trace terms included). Registered on import when
  the extension is built; ``"auto"`` then picks it for float32/float64 CPU tensors.
* :func:`cnf_rk_step`: one explicit RK step of CNF dynamics (``dz/dt = f``, ``dlogp/dt = -trace``,
  optional kinetic / Jacobian-Frobenius integrals) in a single C++ call, with its backward pass.

Dispatch: ``backend="auto"`` (default) follows the global override of :func:`fastode.nn.set_backend` /
``FASTODE_NN_BACKEND``; otherwise C++ for CPU float32/float64 tensors when built, else ``"torch"``.
``backend="cpp"`` or ``"torch"`` forces one; :func:`resolve_backend` says which one a call on given tensors
runs (a :class:`CnfStepper` holds its own in ``.backend``; a CNF solve's record in ``CNF.last_solve.mlp_backend``).

Threads: the kernels use ``torch.get_num_threads()`` OpenMP threads over tiles of the batch; results do
not depend on the thread count. ``FASTODE_CPP_TILE`` sets the rows per tile (default: 64, 128 from a
batch of 512 on).
"""
from __future__ import annotations

from ._loader import available, error, ext
from ._mlp import concatsquash_mlp, concatsquash_mlp_exact_trace, concatsquash_mlp_hutchinson, supports
from ._rk import RATE_CODES, CnfStep, CnfStepper, cnf_adaptive_solve, cnf_rk_step, tableau_lists
from . import _dispatch
from ._dispatch import mlp_tile_rows

__all__ = [
    "available",
    "build_info",
    "concatsquash_mlp",
    "concatsquash_mlp_hutchinson",
    "concatsquash_mlp_exact_trace",
    "supports",
    "cnf_rk_step",
    "cnf_adaptive_solve",
    "tableau_lists",
    "mlp_tile_rows",
    "CnfStep",
    "CnfStepper",
    "empty_cache",
    "cached_bytes",
    "RATE_CODES",
    "resolve_backend",
]

resolve_backend = _dispatch.choose


def empty_cache() -> int:
    """Free the C++ backend's cached buffers (saved activations, kept adaptive steps); returns the bytes released."""
    return ext().empty_cache() if available() else 0


def cached_bytes() -> int:
    """Bytes the C++ backend's buffer pool holds for reuse (freed buffers kept; bounded, see ``csrc/pool.cpp``)."""
    return ext().cached_bytes() if available() else 0


def build_info() -> dict:
    """What the C++ backend is: ``available``, ``error`` (why not), ``path``, ``openmp``, ``gemm``
    (``"blas"`` = the BLAS inside libtorch, ``"fallback"`` = built-in loops; prefixed ``"avx512+"`` when the
    AVX-512 micro-kernels run the wide float32 tanh/identity layers), ``tile`` / ``tile_large`` (rows per tile
    for small / large batches). ``FASTODE_GEMM=blas`` or
    ``fallback`` (read at load) turns the micro-kernels off, ``fallback`` also BLAS."""
    if not available():
        return {"available": False, "error": error()}
    x = ext()
    return {
        "available": True,
        "error": None,
        "path": getattr(x, "__file__", None),
        "openmp": bool(getattr(x, "openmp", False)),
        "gemm": x.gemm_backend(),
        "tile": _dispatch.tile_rows(),  # rows per tile for small batches
        "tile_large": _dispatch.tile_rows(1 << 20),  # and for large ones
    }


if available():  # backend "cpp" of the MLP ops (fastode.ops.mlp imports this package lazily)
    from ..ops.mlp import register_backend as _register_mlp_backend
    from . import _mlp as _mlp_backend

    _register_mlp_backend("cpp", _mlp_backend, devices=("cpu",))
