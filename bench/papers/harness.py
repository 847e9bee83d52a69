"""Shared pieces of the paper reproductions (``bench/papers/run.py``).

* :class:`Scale` -- iteration counts and sizes of one run of the suite (``--quick``: a smoke run of minutes);
* data: the FFJORD toy set (8 Gaussians, a seeded training stream and a fixed test set) and ``breast_cancer``
  (scikit-learn, offline; MAF split, log + standardise: model space);
* :func:`make_flow` builds a seeded FFJORD model, so that every arm of a comparison starts from the same weights;
* :func:`train_flow` trains it and records what the papers report: forward NFE per iteration, wall time, loss,
  NLL and end time; :func:`evaluate_flow` measures test NLL (exact trace), evaluation NFE and inverse error;
* :class:`RunCache` trains an arm once when several papers compare against it (e.g. the unregularised toy CNF);
* :class:`Verdict` -- one row of the summary: the paper's number, fastode's, and a verdict with its reason.

Timings are wall clock of the training loop only (data generation and evaluation excluded, and the first
iteration, which pays one-time costs), on the threads ``run.py`` pins.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from fastode.data import toy as toy_data
from fastode.data.tabular import load_breast_cancer
from fastode.flows import build_flow, density_loss

TOY = "8gaussians"


@dataclass(frozen=True)
class Scale:
    """How long each kind of experiment trains (iterations) and how much data it sees."""

    quick: bool
    toy_iters: int
    toy_batch: int
    toy_test: int
    tab_iters: int
    clf_iters: int
    ts_iters: int

    @staticmethod
    def of(quick: bool) -> "Scale":
        if quick:
            return Scale(True, toy_iters=8, toy_batch=64, toy_test=256, tab_iters=3, clf_iters=4, ts_iters=12)
        return Scale(False, toy_iters=1000, toy_batch=100, toy_test=2000, tab_iters=300, clf_iters=300, ts_iters=300)


# ---------------------------------------------------------------------------------------------------- data
def toy_batches(batch: int, seed: int = 0) -> Callable[[int], torch.Tensor]:
    """The training stream: batch ``i`` of a seeded :class:`fastode.data.toy.ToySampler` (the same for every arm)."""
    sampler = toy_data.ToySampler(TOY, seed)
    cache: list = []

    def get(i: int) -> torch.Tensor:
        while len(cache) <= i:
            cache.append(torch.from_numpy(sampler(batch)))
        return cache[i]
    return get


def toy_test(n: int) -> torch.Tensor:
    return torch.from_numpy(toy_data.toy_sample(TOY, n, seed=12345))


def tabular(seed: int = 42):
    """``breast_cancer`` in model space: ``(train, validation, test)`` float32 tensors (30 dims)."""
    d = load_breast_cancer(seed)
    return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (d.trn, d.val, d.tst))


def full_batches(x: torch.Tensor) -> Callable[[int], torch.Tensor]:
    return lambda i: x


# --------------------------------------------------------------------------------------------------- flows
def make_flow(dim: int, seed: int, hidden=(64, 64, 64), activation: str = "tanh", **cnf_kwargs):
    """FFJORD's one-block model with weights drawn from ``seed`` (identical across the arms of a comparison)."""
    torch.manual_seed(seed)
    return build_flow(dim, hidden=hidden, activation=activation, num_blocks=1, **cnf_kwargs)


@dataclass
class FlowRun:
    """What one training run of a flow measured (lists: one entry per iteration)."""

    name: str
    iters: int
    wall_s: float
    nfe: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    nll: list = field(default_factory=list)
    T: list = field(default_factory=list)
    iter_s: list = field(default_factory=list)
    evals: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def mean_nfe(self) -> float:
        return float(np.mean(self.nfe)) if self.nfe else float("nan")

    def late_nfe(self, frac: float = 0.1) -> float:
        """Mean forward NFE over the last ``frac`` of training (where the unregularised NFE has grown)."""
        k = max(1, int(len(self.nfe) * frac))
        return float(np.mean(self.nfe[-k:])) if self.nfe else float("nan")

    @property
    def median_iter_s(self) -> float:
        return float(np.median(self.iter_s)) if self.iter_s else float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


def _end_time(flow) -> float:
    return float(flow.cnf_blocks()[0].T.detach())


def train_flow(name: str, flow, batches: Callable[[int], torch.Tensor], iters: int, *, lr: float = 1e-3,
               weight_decay: float = 1e-5, t_opt=None, schedule: Callable | None = None, progress=None,
               config: dict | None = None) -> FlowRun:
    """Adam on the flow's density loss (NLL + weighted regularisers) for ``iters`` iterations.

    ``t_opt``: a :class:`fastode.flows.EndTimeOptimizer` (TO-FLOW); the network optimiser then excludes the end
    times. ``schedule(i, flow, optimizer)``: called before iteration ``i`` (multilevel re-discretisation).
    """
    params = flow.network_parameters() if t_opt is not None else list(flow.parameters())
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    run = FlowRun(name, iters, 0.0, config=dict(config or {}))
    flow.train()
    for i in range(iters):
        if schedule is not None:
            schedule(i, flow, opt)
        x = batches(i)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, info = density_loss(flow, x)
        loss.backward()
        opt.step()
        nfe = info["nfe"]
        if t_opt is not None:
            if t_opt.mode == "joint":
                t_opt.step()
            else:
                n0 = flow.nfe
                t_opt.alternate_step(lambda: density_loss(flow, x)[0])
                nfe += flow.nfe - n0  # the coordinate step's own forward solve
            t_opt.zero_grad()
        dt = time.perf_counter() - t0
        if i:  # iteration 0 pays one-time costs (allocator, caches, lazy imports): excluded from wall_s
            run.wall_s += dt
        run.iter_s.append(dt)
        run.nfe.append(nfe)
        run.loss.append(float(loss.detach()))
        run.nll.append(info["nll"])
        run.T.append(_end_time(flow))
        if not math.isfinite(run.loss[-1]):
            run.config["diverged_at"] = i
            break
        if progress is not None:
            progress(1)
    return run


def evaluate_flow(flow, x: torch.Tensor, *, solver: dict | None = None, inverse_n: int = 512) -> dict:
    """Test NLL (exact trace, the evaluation solver or ``solver``), its NFE, and the inverse error
    ``mean ||f^-1(f(x)) - x||`` on the first ``inverse_n`` test points (Onken & Ruthotto eq. 17)."""
    flow.eval()
    try:
        ctx = flow.using_solver(**solver) if solver else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            n0 = flow.nfe
            nll = float(-flow.log_prob(x).mean())
            nfe = flow.nfe - n0
            inv = float(flow.inverse_error(x[:inverse_n]))
    except Exception as err:  # a diverged model: record why instead of aborting the suite
        return {"nll": float("nan"), "nfe": float("nan"), "inverse_error": float("nan"), "failure": repr(err)[:200]}
    finally:
        flow.train()
    return {"nll": nll, "nfe": nfe, "inverse_error": inv}


def flow_row(r: FlowRun) -> dict:
    """One table row of a flow run: training cost and every evaluation (keyed by its solver)."""
    row = {"arm": r.name, "train_s": r.wall_s, "median_iter_ms": 1e3 * r.median_iter_s, "mean_nfe_f": r.mean_nfe,
           "late_nfe_f": r.late_nfe()}
    for k, ev in r.evals.items():
        row[f"nll[{k}]"] = ev["nll"]
        row[f"nfe[{k}]"] = ev["nfe"]
        row[f"inverse_error[{k}]"] = ev["inverse_error"]
    if "diverged_at" in r.config:
        row["diverged_at"] = r.config["diverged_at"]
    return row


_YLABELS = {"nfe": "forward NFE", "loss": "training loss (nats)", "T": "end time T", "nll": "training NLL (nats)"}


def plot_curves(runs: dict, attr: str, title: str):
    """One curve per run of ``run.<attr>`` against the iteration."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, r in runs.items():
        ax.plot(getattr(r, attr), label=k, lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel(_YLABELS.get(attr, attr))
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


class RunCache:
    """Runs by name: an arm that several papers compare against trains once per invocation."""

    def __init__(self):
        self.runs: dict = {}

    def get(self, name: str, make: Callable[[], object]):
        if name not in self.runs:
            self.runs[name] = make()
        return self.runs[name]


# ------------------------------------------------------------------------------------------------- verdicts
@dataclass
class Verdict:
    """One row of the summary table."""

    paper: str
    experiment: str
    claim: str
    paper_value: str
    measured: str
    verdict: str   # "reproduced", "partly", "not reproduced"
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


def grade(ok: bool, partly: bool = False) -> str:
    return "reproduced" if ok else ("partly" if partly else "not reproduced")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ------------------------------------------------------------------------------ the regularised toy CNF arms
TOY_REG_BASE = dict(T=0.5, learn_T=False, trace="hutchinson", method="dopri5", rtol=1e-5, atol=1e-5)


def toy_arm(cache: RunCache, scale: Scale, progress, name: str, *, t_opt_kwargs: dict | None = None, **changes):
    """A toy CNF arm of the regulariser papers (RNODE, TayNODE, TO-FLOW, Pal): FFJORD's 64-64-64 tanh model on
    8 Gaussians, dopri5 1e-5, Hutchinson trace in training, fixed T = 0.5 unless ``changes`` say otherwise;
    evaluated with the training solver and the exact trace. Trained once per invocation (``cache``)."""
    def make():
        from fastode.flows import EndTimeOptimizer

        kw = {**TOY_REG_BASE, **changes}
        flow = make_flow(2, 0, **kw)
        t_opt = EndTimeOptimizer(flow, **t_opt_kwargs) if t_opt_kwargs is not None else None
        run = train_flow(name, flow, toy_batches(scale.toy_batch), scale.toy_iters, t_opt=t_opt, progress=progress,
                         config={**kw, **({"end_time_optimizer": t_opt_kwargs} if t_opt_kwargs else {})})
        run.evals["eval"] = evaluate_flow(flow, toy_test(scale.toy_test))
        return run
    return cache.get(f"toy {name}", make)
