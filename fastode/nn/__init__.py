"""Concatsquash MLPs with interchangeable backends ("torch" reference, "triton", "cpp").

``fastode.nn.functional`` is the executable spec; ``fastode.nn.backends`` the registry and selection.
"""
from . import backends, functional
from .backends import (
    available_backends,
    get_backend,
    get_global_backend,
    register_backend,
    register_lazy_backend,
    select_backend,
    set_backend,
    use_backend,
)
from .functional import (
    ACTIVATIONS,
    concatsquash_mlp,
    concatsquash_mlp_exact_trace,
    concatsquash_mlp_hutchinson,
)
from .modules import ConcatSquashLinear, ConcatSquashMLP

__all__ = [
    "ACTIVATIONS",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
    "available_backends",
    "backends",
    "concatsquash_mlp",
    "concatsquash_mlp_exact_trace",
    "concatsquash_mlp_hutchinson",
    "functional",
    "get_backend",
    "get_global_backend",
    "register_backend",
    "register_lazy_backend",
    "select_backend",
    "set_backend",
    "use_backend",
]
