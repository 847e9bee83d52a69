"""Built-in benchmark problems with independent reference solutions.

Each ``Problem`` has a PyTorch right-hand side (state shape ``(batch, dim)``; ``batch == 1`` for the
classic problems) used by fastode / torchdiffeq / torchode, an equivalent NumPy right-hand side
(flattened state) used by scipy, and ``reference()``: y(t1) from scipy's DOP853 at rtol 1e-13 /
atol 1e-15, cross-checked against Radau at the same tolerance (or the analytic solution where one
exists).  ``reference_error`` is the distance between the two, i.e. the floor below which
errors measured against the reference are meaningless.

Problems
--------
cubic_spiral    torchdiffeq's demo: y' = (y**3) A, A = [[-0.1, 2], [-2, -0.1]], y0 = (2, 0), t in [0, 25]
van_der_pol     x'' = mu (1 - x^2) x' - x, mu = 1, (x, x')(0) = (2, 0), t in [0, 10]
lotka_volterra  x' = 1.5 x - x y, y' = -3 y + x y, (x, y)(0) = (10, 5), t in [0, 15]
linear          y' = A y, A = [[-0.1, 1], [-1, -0.1]] (damped rotation), analytic reference, t in [0, 10]
neural_ode      batched neural ODE: y' = MLP([y, t]) (tanh, 2 hidden layers of 64), fixed random
                weights W ~ N(0, 9 / fan_in) (seed 0), batch 64, dim 4, t in [0, 1]; all 64 samples
                form one ODE system
"""
from __future__ import annotations

import functools
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

REF_RTOL, REF_ATOL = 1e-13, 1e-15


@dataclass(eq=False)
class Problem:
    name: str
    description: str
    y0: np.ndarray                       # (batch, dim)
    t0: float
    t1: float
    rhs_numpy: Callable                  # (t, y_flat) -> dy_flat, for scipy
    make_rhs_torch: Callable             # (dtype) -> f(t, y[batch, dim]) -> dy
    analytic: Callable | None = None     # t -> y(t) (batch, dim), if known
    meta: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.y0.shape[0]

    @property
    def dim(self) -> int:
        return self.y0.shape[1]

    def y0_torch(self, dtype):
        import torch

        return torch.tensor(self.y0, dtype=dtype)

    @functools.cache
    def reference(self) -> tuple[np.ndarray, float, str]:
        """(y(t1) as (batch, dim), estimated error of the reference, how it was obtained).

        Cached on disk in ``bench/results/tmp/`` (git-ignored), keyed by the problem name and a hash of
        this file and scipy's version, so the slow Radau cross-check runs once per change."""
        import hashlib
        import json

        import scipy

        key = hashlib.sha256(Path(__file__).read_bytes() + scipy.__version__.encode()).hexdigest()[:16]
        cache = Path(__file__).resolve().parent / "results" / "tmp" / f"reference_{self.name}_{key}.json"
        if cache.exists():
            d = json.loads(cache.read_text())
            return np.array(d["y"]).reshape(self.y0.shape), d["err"], d["how"]
        y, err, how = self._compute_reference()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"y": y.ravel().tolist(), "err": err, "how": how}))
        except OSError:
            pass
        return y, err, how

    def _compute_reference(self):
        from scipy.integrate import solve_ivp

        y0 = self.y0.ravel()
        dop = solve_ivp(self.rhs_numpy, (self.t0, self.t1), y0, method="DOP853", rtol=REF_RTOL,
                        atol=REF_ATOL)
        if not dop.success:
            raise RuntimeError(f"reference solve failed for {self.name}: {dop.message}")
        y_dop = dop.y[:, -1].reshape(self.y0.shape)
        if self.analytic is not None:
            y_ref = self.analytic(self.t1)
            return y_ref, rel_error(y_dop, y_ref), "analytic (checked against scipy DOP853 rtol 1e-13)"
        rad = solve_ivp(self.rhs_numpy, (self.t0, self.t1), y0, method="Radau", rtol=REF_RTOL,
                        atol=REF_ATOL)
        y_rad = rad.y[:, -1].reshape(self.y0.shape)
        return y_dop, rel_error(y_rad, y_dop), "scipy DOP853 rtol 1e-13 (checked against Radau rtol 1e-13)"


def rel_error(y, y_ref) -> float:
    """Relative L2 error of the final state: ||y - y_ref|| / ||y_ref|| (all components together)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    y_ref = np.asarray(y_ref, dtype=np.float64).reshape(-1)
    return float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))


# ----------------------------------------------------------------------------------------------- classic
_SPIRAL_A = np.array([[-0.1, 2.0], [-2.0, -0.1]])


def _cubic_spiral() -> Problem:
    def rhs_numpy(t, y):
        return (y ** 3) @ _SPIRAL_A

    def make(dtype):
        import torch

        A = torch.tensor(_SPIRAL_A, dtype=dtype)

        def f(t, y):
            return (y ** 3) @ A
        return f

    return Problem("cubic_spiral", "y' = (y^3) A (torchdiffeq demo), t in [0, 25]",
                   np.array([[2.0, 0.0]]), 0.0, 25.0, rhs_numpy, make)


def _van_der_pol(mu: float = 1.0) -> Problem:
    def rhs_numpy(t, y):
        return np.array([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    def make(dtype):
        import torch

        def f(t, y):
            x, v = y[..., 0:1], y[..., 1:2]
            return torch.cat([v, mu * (1 - x * x) * v - x], dim=-1)
        return f

    return Problem("van_der_pol", f"Van der Pol, mu = {mu}, t in [0, 10]", np.array([[2.0, 0.0]]),
                   0.0, 10.0, rhs_numpy, make, meta={"mu": mu})


def _lotka_volterra(a=1.5, b=1.0, c=3.0, d=1.0) -> Problem:
    def rhs_numpy(t, y):
        return np.array([a * y[0] - b * y[0] * y[1], -c * y[1] + d * y[0] * y[1]])

    def make(dtype):
        import torch

        def f(t, y):
            x, z = y[..., 0:1], y[..., 1:2]
            return torch.cat([a * x - b * x * z, -c * z + d * x * z], dim=-1)
        return f

    return Problem("lotka_volterra", "Lotka-Volterra (1.5, 1, 3, 1), y0 = (10, 5), t in [0, 15]",
                   np.array([[10.0, 5.0]]), 0.0, 15.0, rhs_numpy, make)


_LIN_A = np.array([[-0.1, 1.0], [-1.0, -0.1]])


def _linear() -> Problem:
    y0 = np.array([[1.0, 0.5]])

    def rhs_numpy(t, y):
        return _LIN_A @ y

    def make(dtype):
        import torch

        At = torch.tensor(_LIN_A.T, dtype=dtype)

        def f(t, y):
            return y @ At
        return f

    def analytic(t):
        # exp(A t) for A = [[a, w], [-w, a]]: e^{a t} [[cos wt, sin wt], [-sin wt, cos wt]]
        a, w = -0.1, 1.0
        E = np.exp(a * t) * np.array([[np.cos(w * t), np.sin(w * t)], [-np.sin(w * t), np.cos(w * t)]])
        return (E @ y0[0])[None, :]

    return Problem("linear", "damped rotation y' = A y (analytic), t in [0, 10]", y0, 0.0, 10.0,
                   rhs_numpy, make, analytic=analytic)


# ----------------------------------------------------------------------------------------------- neural
def mlp_weights(dim: int, hidden: int, layers: int = 2, seed: int = 0, scale: float = 1.0):
    """Deterministic weights of ``dim+1 -> hidden -> ... -> dim`` (input = [y, t]), NumPy float64."""
    rng = np.random.default_rng(seed)
    sizes = [dim + 1] + [hidden] * layers + [dim]
    ws = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = rng.normal(0.0, scale / np.sqrt(n_in), size=(n_out, n_in))
        b = rng.normal(0.0, 0.1, size=(n_out,))
        ws.append((W, b))
    return ws


def _neural_ode(batch: int = 64, dim: int = 4, hidden: int = 64, seed: int = 0) -> Problem:
    ws = mlp_weights(dim, hidden, seed=seed, scale=3.0)
    rng = np.random.default_rng(seed + 1)
    y0 = rng.normal(size=(batch, dim))

    def mlp_np(t, y):
        h = np.concatenate([y, np.full((y.shape[0], 1), t)], axis=1)
        for i, (W, b) in enumerate(ws):
            h = h @ W.T + b
            if i < len(ws) - 1:
                h = np.tanh(h)
        return h

    def rhs_numpy(t, y):
        return mlp_np(t, y.reshape(batch, dim)).ravel()

    def make(dtype):
        import torch

        params = [(torch.tensor(W, dtype=dtype), torch.tensor(b, dtype=dtype)) for W, b in ws]

        def f(t, y):
            h = torch.cat([y, torch.as_tensor(t, dtype=y.dtype).expand(y.shape[0], 1)], dim=1)
            for i, (W, b) in enumerate(params):
                h = torch.nn.functional.linear(h, W, b)
                if i < len(params) - 1:
                    h = torch.tanh(h)
            return h
        return f

    return Problem("neural_ode", f"batched neural ODE: MLP([y,t]) tanh {dim}+1->{hidden}->{hidden}->{dim}, "
                   f"batch {batch}, t in [0, 1]", y0, 0.0, 1.0, rhs_numpy, make,
                   meta={"batch": batch, "dim": dim, "hidden": hidden, "seed": seed})


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "cubic_spiral": _cubic_spiral,
    "van_der_pol": _van_der_pol,
    "lotka_volterra": _lotka_volterra,
    "linear": _linear,
    "neural_ode": _neural_ode,
}


@functools.cache
def get_problem(name: str) -> Problem:
    try:
        return PROBLEMS[name]()
    except KeyError:
        raise ValueError(f"unknown problem {name!r}; choose from {sorted(PROBLEMS)}") from None
