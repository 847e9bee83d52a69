"""A neural-ODE classifier on scikit-learn's ``digits`` (8x8 images, offline), the supervised model of the
TayNODE and Pal et al. comparisons: ``Linear(64, 32) -> tanh -> ODE block on [0, 1] -> Linear(32, 10)``, the
block's dynamics an MLP of ``[z, t]`` (33 -> 64 -> 32, tanh), solved by ``fastode.odeint`` (dopri5, rtol = atol =
1e-5, gradient through the discrete solve). Regularisers, with the same conventions as the CNF's:

* ``r2`` / ``r3``: TayNODE ``int ||d^K z/dt^K||^2 dt`` (exact total derivatives by nested forward mode,
  :func:`fastode.flows.taylor_derivative`), integrated as an extra state that step-size control does not see;
* ``rnode``: kinetic ``int ||f||^2`` + Jacobian-Frobenius ``int ||e^T df/dz||^2`` (Hutchinson probe per solve);
* ``global_error``: ``sum_j E_j |dt_j|`` over the accepted steps (differentiable step errors of the solve);
* ``local_error`` / ``local_error_biased``: Pal et al.'s single embedded step from ``t_reg``
  (:func:`fastode.flows.solver.local_error_step`), ``t_reg ~ U[0, 1)`` or a random accepted step start.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.datasets import load_digits

import fastode
from fastode.flows import taylor_derivative
from fastode.flows.solver import local_error_step

RTOL = ATOL = 1e-5
WEIGHTS = {"r2": 0.01, "r3": 0.01, "rnode": 0.01, "global_error": 1.0, "local_error": 1.0,
           "local_error_biased": 1.0}


def digits(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    perm = np.random.RandomState(seed).permutation(len(x))
    x, y = x[perm].astype(np.float32), y[perm]
    n_test = len(x) // 5
    mu, sd = x[n_test:].mean(0), x[n_test:].std(0) + 1e-3
    x = (x - mu) / sd
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return t(x[n_test:]), t(y[n_test:]), t(x[:n_test]), t(y[:n_test])


class ODEClassifier(torch.nn.Module):
    def __init__(self, seed: int = 0, width: int = 32, hidden: int = 64):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = torch.nn.Linear(64, width)
        self.f1, self.f2 = torch.nn.Linear(width + 1, hidden), torch.nn.Linear(hidden, width)
        self.head = torch.nn.Linear(width, 10)
        self.nfe = 0

    def dynamics(self, t, z):
        tt = t.reshape(1, 1).expand(z.shape[0], 1).to(z.dtype)
        return self.f2(torch.tanh(self.f1(torch.cat([z, tt], 1))))

    def f(self, t, z):
        self.nfe += 1
        return self.dynamics(t, z)

    def forward(self, x, reg: str | None = None):
        """``(logits, reg value or None, stats)``."""
        z0 = torch.tanh(self.enc(x))
        ts = torch.tensor([0.0, 1.0])
        if reg in ("r2", "r3", "rnode"):
            zT, r, stats = self._augmented(z0, ts, reg)
            return self.head(zT), r, stats
        zs, stats = fastode.odeint(self.f, z0, ts, method="dopri5", rtol=RTOL, atol=ATOL, return_stats=True)
        value = None
        if reg == "global_error":
            value = sum(e * abs(h) for e, h in zip(stats.step_errors, stats.step_sizes))
        elif reg in ("local_error", "local_error_biased"):
            value = self._local(z0, stats, biased=reg.endswith("biased"))
        return self.head(zs[-1]), value, stats

    def _augmented(self, z0, ts, reg):
        B, W = z0.shape
        n = B * W
        e = torch.randn_like(z0) if reg == "rnode" else None

        def aug(t, v):
            self.nfe += 1
            z = v[:n].reshape(B, W)
            if reg == "rnode":
                with torch.enable_grad():
                    zz = z if z.requires_grad else z.detach().requires_grad_()
                    fz = self.dynamics(t, zz)
                    vjp = torch.autograd.grad(fz, zz, e, create_graph=True)[0]
                rate = fz.pow(2).sum(1) + vjp.pow(2).sum(1)
            else:
                fz = self.dynamics(t, z)
                order = int(reg[1])
                dk = taylor_derivative(lambda tt, zz: self.dynamics(tt, zz), t, z, order)
                rate = dk.pow(2).sum(1)
            return torch.cat([fz.reshape(-1), rate])

        def norm(v):  # step control on z only (the regulariser state never steers)
            return v[:n].pow(2).mean().sqrt()

        v0 = torch.cat([z0.reshape(-1), z0.new_zeros(B)])
        vs, stats = fastode.odeint(aug, v0, ts, method="dopri5", rtol=RTOL, atol=ATOL, options={"norm": norm},
                                   return_stats=True)
        return vs[-1, :n].reshape(B, W), vs[-1, n:].mean(), stats

    def _local(self, z0, stats, biased: bool):
        if biased:
            t_reg = float(np.random.choice(stats.step_ts))
        else:
            t_reg = float(np.random.uniform(0.0, 1.0))
        with torch.no_grad():  # u(t_reg) and f(t_reg) are constants, as in Pal et al.'s code
            u = z0.detach() if t_reg == 0.0 else \
                fastode.odeint(self.f, z0.detach(), torch.tensor([0.0, t_reg]), method="dopri5", rtol=RTOL,
                               atol=ATOL)[-1]
            tr = torch.tensor(t_reg)
            f0 = self.f(tr, u)
        func = lambda t, ys: (self.f(t, ys[0]),)  # noqa: E731
        norm = lambda ys: ys[0].pow(2).mean().sqrt()  # noqa: E731
        ratio, dt, _ = local_error_step(func, tr, (u,), (f0,), "dopri5", RTOL, ATOL, norm, torch.tensor(1.0))
        return ratio * dt


def train(name: str, reg: str | None, iters: int, progress, seed: int = 0, batch: int = 128) -> dict:
    xtr, ytr, xte, yte = digits()
    model = ODEClassifier(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = np.random.RandomState(seed)
    np.random.seed(seed)  # t_reg draws
    torch.manual_seed(seed)
    wall, nfes, losses = 0.0, [], []
    for i in range(iters):
        idx = torch.from_numpy(gen.choice(len(xtr), batch, replace=False))
        t0 = time.perf_counter()
        model.nfe = 0
        opt.zero_grad(set_to_none=True)
        logits, value, _ = model(xtr[idx], reg)
        loss = torch.nn.functional.cross_entropy(logits, ytr[idx])
        if value is not None:
            loss = loss + WEIGHTS[reg] * value
        loss.backward()
        opt.step()
        if i:
            wall += time.perf_counter() - t0
        nfes.append(model.nfe)
        losses.append(float(loss.detach()))
        progress(1)
    with torch.no_grad():
        model.nfe = 0
        t0 = time.perf_counter()
        logits, _, stats = model(xte)
        pred_s = time.perf_counter() - t0
        acc = float((logits.argmax(1) == yte).float().mean())
        train_acc = float((model(xtr)[0].argmax(1) == ytr).float().mean())
    return {"arm": name, "train_s": wall, "mean_nfe_train": float(np.mean(nfes)),
            "late_nfe_train": float(np.mean(nfes[-max(1, iters // 10):])), "test_nfe": stats.num_fevals,
            "predict_s": pred_s, "test_accuracy": acc, "train_accuracy": train_acc,
            "final_loss": float(np.mean(losses[-max(1, iters // 20):])), "nfe": nfes, "loss": losses}


def arm(cache, scale, progress, reg: str | None):
    name = reg or "none"
    return cache.get(f"classifier {name}", lambda: train(name, reg, scale.clf_iters, progress))


def row(r: dict) -> dict:
    return {k: v for k, v in r.items() if not isinstance(v, list)}
