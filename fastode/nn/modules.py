"""Concatsquash layers and MLPs (FFJORD's ``ConcatSquashLinear`` / ``ODEnet``) on top of the backends."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops import mlp as _mlp_ops
from . import backends as _backends
from .functional import ACTIVATIONS

__all__ = ["ConcatSquashLinear", "ConcatSquashMLP", "ConcatSquashEvaluation", "BoundEvaluation"]


class ConcatSquashLinear(nn.Module):
    """FFJORD's ``ConcatSquashLinear``: ``(W x + b) * sigmoid(gw t + gb) + bw t``.

    Submodule names match FFJORD (``_layer``, ``_hyper_gate``, ``_hyper_bias``) so that FFJORD state dicts
    load unchanged; initialisation is PyTorch's ``nn.Linear`` default, as in FFJORD.
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = nn.Linear(1, dim_out)

    def params(self):
        """The layer's ``(W, b, gw, gb, bw)`` tuple in the layout of :mod:`fastode.nn.functional`.

        Read from the submodules' parameter dicts (a module call reads them on every evaluation, and
        ``nn.Module.__getattr__`` is most of that cost); attributes that are not plain parameters (e.g. a
        ``torch.nn.utils.parametrize`` parametrization) are read as attributes."""
        try:
            lp = self._modules["_layer"]._parameters
            gp = self._modules["_hyper_gate"]._parameters
            W, b, gw, gb = lp["weight"], lp["bias"], gp["weight"], gp["bias"]
            bw = self._modules["_hyper_bias"]._parameters["weight"]
        except KeyError:
            W, b = self._layer.weight, self._layer.bias
            gw, gb, bw = self._hyper_gate.weight, self._hyper_gate.bias, self._hyper_bias.weight
        return (W, b, gw.view(-1), gb, bw.view(-1))

    def forward(self, t, x):
        W, b, gw, gb, bw = self.params()
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(())
        return (x @ W.t() + b) * torch.sigmoid(gw * t + gb) + bw * t


class BoundEvaluation:
    """A concatsquash MLP fixed for one solve (:meth:`ConcatSquashEvaluation.bind`): ``forward(t, z)`` and
    ``forward_with_trace(t, z, e=None, exact=False)`` as the module's, with the parameters, the backend and the
    input checks settled once, at binding (the backend's ``mlp.bind``). ``z`` keeps the bound shape ``(B, dim)``."""

    __slots__ = ("_bound", "_module", "backend")

    def __init__(self, module, bound):
        self._module, self._bound, self.backend = module, bound, bound.backend

    def __call__(self, t, z):
        return self._bound.forward(t, z)

    forward = __call__

    def forward_with_trace(self, t, z, e=None, exact: bool = False):
        if exact:
            f, trace = self._bound.exact_trace(t, z)
            return f, trace, (f * f).sum(-1), None
        if e is None:
            e = self._module.sample_noise(z)
        f, _vjp, trace, kinetic, jac_frob = self._bound.hutchinson(t, z, e)
        return f, trace, kinetic, jac_frob


class ConcatSquashEvaluation:
    """Evaluation of a concatsquash MLP through the selected backend, shared by every module that can say which
    ``(W, b, gw, gb, bw)`` tuples apply at time ``t`` (:meth:`params_at`) and has ``dim``, ``activation``,
    ``backend``, ``noise`` and ``last_backend`` attributes."""

    def _configure(self, dim, hidden, activation, backend, noise):
        """Validate and record the settings every concatsquash MLP shares; returns the layer widths."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        if noise not in ("gaussian", "rademacher"):
            raise ValueError(f"noise must be 'gaussian' or 'rademacher', got {noise!r}")
        self.dim = int(dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.backend = _backends._check_name(backend)
        self.noise = noise
        self.last_backend: str | None = None
        return (self.dim,) + self.hidden + (self.dim,)

    def params_at(self, t):
        raise NotImplementedError

    time_varying_params = True
    """Whether :meth:`params_at` depends on ``t`` (then :meth:`bind` cannot fix the parameters)."""

    def bind(self, like: torch.Tensor):
        """This network for a solve on inputs like ``like`` ``(B, dim)``: a :class:`BoundEvaluation` with the
        backend chosen and the inputs checked once (the per-stage calls of a solve then cost the kernel call), or
        the module itself when that cannot be fixed (time-varying parameters, forward hooks, other shapes)."""
        if (self.time_varying_params or like.dim() != 2 or like.shape[-1] != self.dim
                or getattr(self, "_forward_hooks", None) or getattr(self, "_forward_pre_hooks", None)):
            return self
        with torch.enable_grad():  # views made under no_grad would not carry gradients to the parameters later
            params = self.params_at(None)
        bound = _mlp_ops.bind(params, self.activation, like, self.backend)
        self.last_backend = bound.backend
        return BoundEvaluation(self, bound)

    def _prepare(self, t, z):
        if z.shape[-1] != self.dim:
            raise ValueError(f"z has last dimension {z.shape[-1]} but the MLP was built for dim={self.dim}")
        z2 = z.reshape(-1, self.dim)
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        if t.numel() != 1:
            raise ValueError(f"t must be a scalar time, got shape {tuple(t.shape)}")
        t = t.reshape(())
        params = self.params_at(t)
        name, impl = _backends.select_backend(self.backend, t, z2, params, self.activation)
        self.last_backend = name
        return t, z2, params, impl

    def forward(self, t, z):
        """``f(t, z)``."""
        t, z2, params, impl = self._prepare(t, z)
        return impl.concatsquash_mlp(t, z2, params, self.activation).reshape(z.shape)

    def sample_noise(self, z):
        if self.noise == "rademacher":
            return torch.randint(0, 2, z.shape, device=z.device).to(z.dtype) * 2 - 1
        return torch.randn_like(z)

    def forward_with_trace(self, t, z, e=None, exact: bool = False):
        """``(f, trace, kinetic, jac_frob)``.

        ``exact=False``: Hutchinson estimate ``trace = e^T (df/dz) e`` with the noise ``e`` (drawn from
        ``self.noise`` when None; pass the same ``e`` for every stage of a solve, as FFJORD does),
        ``kinetic = |f|^2`` and ``jac_frob = |e^T df/dz|^2`` per sample.
        ``exact=True``: exact divergence; ``kinetic = |f|^2`` and ``jac_frob = None``.
        Per-sample outputs have ``z``'s leading shape.
        """
        t, z2, params, impl = self._prepare(t, z)
        lead = z.shape[:-1]
        if exact:
            f, trace = impl.concatsquash_mlp_exact_trace(t, z2, params, self.activation)
            kinetic = (f * f).sum(-1)
            return f.reshape(z.shape), trace.reshape(lead), kinetic.reshape(lead), None
        if e is None:
            e = self.sample_noise(z)
        elif e.shape != z.shape:
            raise ValueError(f"e has shape {tuple(e.shape)} but z has {tuple(z.shape)}; they must match")
        f, _vjp, trace, kinetic, jac_frob = impl.concatsquash_mlp_hutchinson(
            t, z2, e.reshape(-1, self.dim), params, self.activation)
        return f.reshape(z.shape), trace.reshape(lead), kinetic.reshape(lead), jac_frob.reshape(lead)


class ConcatSquashMLP(ConcatSquashEvaluation, nn.Module):
    """Concatsquash MLP ``dim -> hidden... -> dim`` with an activation after every layer but the last.

    Usable directly as ``func(t, z)`` in :func:`fastode.odeint`. ``backend`` is ``"auto"`` (Triton on
    CUDA, the C++ extension on CPU when built, else the PyTorch reference; the global
    :func:`fastode.nn.set_backend` override applies) or a backend name. The backend used by the module's own latest
    call is in :attr:`last_backend` (the fused CNF engines do not call the module: ``CNF.last_solve.mlp_backend``
    says which backend ran a solve).

    ``z`` may have leading batch dimensions ``(..., dim)``; they are flattened for the kernels.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh",
                 backend: str = "auto", noise: str = "gaussian"):
        super().__init__()
        dims = self._configure(dim, hidden, activation, backend, noise)
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}, backend={self.backend!r}"

    def params(self):
        """List of per-layer ``(W, b, gw, gb, bw)`` tuples."""
        return [layer.params() for layer in self._modules["layers"]]

    @property
    def time_varying_params(self) -> bool:
        return type(self).params_at is not ConcatSquashMLP.params_at   # a subclass overriding params_at

    def params_at(self, t):
        """The parameters used at time ``t`` (constant here). Subclasses with time-varying weights (e.g. Disc-Opt
        interpolation between control times) override this and inherit forward / forward_with_trace."""
        return self.params()
