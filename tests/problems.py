"""Shared analytic test problems (used by the solver, gradient and adjoint tests).

Every problem is an ``nn.Module`` with ``forward(t, y)`` and ``y_exact(t)`` (``t`` a 1-D tensor; returns
``(len(t), *y0.shape)``). ``construct_problem`` mirrors torchdiffeq's test helper.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

DTYPES = (torch.float32, torch.float64)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ADAPTIVE_METHODS = ("dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic")
RK_METHODS = ADAPTIVE_METHODS + FIXED_METHODS
TORCHDIFFEQ_ADAPTIVE = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")   # shared with torchdiffeq 0.2.5
TORCHDIFFEQ_FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4")


def rel_error(true, estimate):
    return ((true - estimate) / true).abs().max()


class ConstantODE(torch.nn.Module):
    """y' = a + (y - (a t + b))^5, y(t) = a t + b (torchdiffeq's)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.2))
        self.b = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, t, y):
        return self.a + (y - (self.a * t + self.b)) ** 5

    def y_exact(self, t):
        return self.a * t + self.b


class SineODE(torch.nn.Module):
    """torchdiffeq's 'sine' problem (start at t >= 1)."""

    def forward(self, t, y):
        return 2 * y / t + t ** 4 * torch.sin(2 * t) - t ** 2 + 4 * t ** 3

    def y_exact(self, t):
        return (-0.5 * t ** 4 * torch.cos(2 * t) + 0.5 * t ** 3 * torch.sin(2 * t) + 0.25 * t ** 2 * torch.cos(2 * t)
                - t ** 3 + 2 * t ** 4 + (math.pi - 0.25) * t ** 2)


class LinearODE(torch.nn.Module):
    """y' = A y with a fixed random (seeded) near-skew A, y(0) = 1; exact solution by scipy.linalg.expm."""

    def __init__(self, dim=10, seed=0):
        super().__init__()
        self.dim = dim
        g = torch.Generator().manual_seed(seed)
        U = torch.randn(dim, dim, generator=g) * 0.1
        A = 2 * U - (U + U.transpose(0, 1))
        self.A = torch.nn.Parameter(A)
        self.initial_val = np.ones((dim, 1))

    def forward(self, t, y):
        return torch.mm(self.A, y.reshape(self.dim, 1)).reshape(-1)

    def y_exact(self, t):
        t_numpy = t.detach().cpu().numpy()
        A_np = self.A.detach().cpu().numpy().astype(np.float64)
        ans = [np.matmul(scipy.linalg.expm(A_np * t_i), self.initial_val) for t_i in t_numpy]
        return torch.tensor(np.stack(ans)).reshape(len(t_numpy), self.dim).to(t)


class ExpDecay(torch.nn.Module):
    """y' = -k * y (+ omega rotation for 2-vectors): y(t) = exp(-k (t - t0)) R(omega (t - t0)) y0.

    Analytic gradients: d y(T) / d y0 = exp(-k T) R(omega T); d y(T) / dk = -(T - t0) y(T).
    """

    def __init__(self, k=0.7, omega=2.0):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k))
        self.omega = torch.nn.Parameter(torch.tensor(omega))

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([-self.k * x - self.omega * v, self.omega * x - self.k * v], dim=-1)

    def y_exact(self, t, y0, t0=0.0):
        s = (t - t0).reshape(-1, *([1] * (y0.dim() - 1)))
        c, sn = torch.cos(self.omega * s), torch.sin(self.omega * s)
        x0, v0 = y0[..., 0], y0[..., 1]
        x = c * x0 - sn * v0
        v = sn * x0 + c * v0
        return torch.exp(-self.k * s)[..., None] * torch.stack([x, v], dim=-1)


class TimeDependent(torch.nn.Module):
    """y' = cos(t) * y: y(t) = y0 exp(sin t - sin t0). Exercises t-dependence (gradients w.r.t. t)."""

    def forward(self, t, y):
        return torch.cos(t) * y

    def y_exact(self, t, y0, t0=0.0):
        t0 = torch.as_tensor(t0, dtype=t.dtype)
        s = (torch.sin(t) - torch.sin(t0)).reshape(-1, *([1] * y0.dim()))
        return y0 * torch.exp(s)


class TupleODE(torch.nn.Module):
    """(x, z)' = (-x, sum(x)) with x of shape (2, 3), z of shape (): z(t) = z0 + sum(x0) (1 - exp(-t))."""

    def forward(self, t, y):
        x, z = y
        return -x, x.sum()

    def y_exact(self, t, y0):
        x0, z0 = y0
        e = torch.exp(-t)
        return e.reshape(-1, 1, 1) * x0, z0 + x0.sum() * (1 - e)


class MatrixODE:
    """y' = M y (+ t forcing) with reference solution from scipy.linalg.expm (for convergence tests)."""

    def __init__(self, dim=3, seed=1):
        rng = np.random.default_rng(seed)
        self.M = rng.standard_normal((dim, dim)) * 0.6 - 0.3 * np.eye(dim)
        self.y0 = rng.standard_normal(dim)

    def func(self, dtype=torch.float64):
        M = torch.tensor(self.M, dtype=dtype)
        return lambda t, y: M @ y

    def exact(self, T):
        return scipy.linalg.expm(self.M * T) @ self.y0


PROBLEMS = {'constant': ConstantODE, 'linear': LinearODE, 'sine': SineODE}


def construct_problem(device='cpu', npts=10, ode='constant', reverse=False, dtype=torch.float64):
    """torchdiffeq's helper: ``(f, y0 (requires grad), t_points (requires grad unless reversed), sol)``."""
    f = PROBLEMS[ode]().to(dtype=dtype, device=device)
    t_points = torch.linspace(1, 8, npts, dtype=dtype, device=device, requires_grad=True)
    sol = f.y_exact(t_points)
    if reverse:
        t_points = t_points.flip(0).clone().detach()
        sol = sol.flip(0).clone().detach()
    return f, sol[0].detach().requires_grad_(True), t_points, sol


class Counter:
    """Wrap ``func`` and count its evaluations (``.n``)."""

    def __init__(self, func):
        self.func = func
        self.n = 0

    def __call__(self, t, y):
        self.n += 1
        return self.func(t, y)


class InitialStepCase:
    """A linear problem ``y' = A y`` for the first-step heuristic, and the spec's answer on it
    (:func:`fastode.ops.rk.initial_step` with the adaptive solver's ``order - 1``): ``d0 = |y0/s|``, ``d1 = |f0/s|``,
    ``d2_of(h0)`` (the norm of the slope's change over a trial step ``h0``, over ``h0``) and ``dt``. ``case``:
    ``"ordinary"``, ``"tiny-state"`` (``d0 < 1e-5``), ``"flat"`` (``f = 0``: ``d1, d2 <= 1e-15``) or ``"stiff"``. The
    native copies of the heuristic's two formulas are checked against it (tests/test_cpp_control.py,
    tests/test_kernels_control.py)."""

    CASES = ("ordinary", "tiny-state", "flat", "stiff")
    ORDER, RTOL, ATOL = 5, 1e-5, 1e-7

    def __init__(self, case: str, dtype: torch.dtype):
        from fastode.ops.rk import initial_step

        g = torch.Generator().manual_seed(3)
        y0 = torch.randn(40, generator=g, dtype=torch.float64)
        A = torch.randn(40, 40, generator=g, dtype=torch.float64) / 4
        y0 = {"tiny-state": y0 * 1e-9}.get(case, y0)
        A = {"flat": torch.zeros_like(A), "stiff": A * 1e4}.get(case, A)
        self.dtype, self.y0, self.A = dtype, y0.to(dtype), A.to(dtype)
        self.f0 = self.A @ self.y0
        self.scale = self.ATOL + self.y0.abs() * self.RTOL
        self.d0, self.d1 = float(self._norm(self.y0 / self.scale)), float(self._norm(self.f0 / self.scale))
        dt, _ = initial_step(lambda t, y: self.A @ y, torch.zeros((), dtype=dtype), self.y0, self.f0, self.ORDER - 1,
                             self.RTOL, self.ATOL, self._norm)
        self.dt = float(dt)

    @staticmethod
    def _norm(x):
        return x.pow(2).mean().sqrt()

    def d2_of(self, h0: float) -> float:
        h = torch.tensor(h0, dtype=self.dtype)
        return float(self._norm((self.A @ (self.y0 + h * self.f0) - self.f0) / self.scale) / h)
