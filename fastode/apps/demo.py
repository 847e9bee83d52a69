"""The main-job demo: ``fastode demo`` (or ``python -m fastode demo``).

Trains a small FFJORD CNF on built-in 2-D data twice, from the same initial weights, on the same batches,
with the same Hutchinson noise (when the trace is stochastic) and the same solver (method and tolerances):

* **fastode**: :func:`fastode.odeint` and the fused concatsquash kernels (C++ on CPU, Triton on CUDA);
* **torchdiffeq**: FFJORD's stack -- ``torchdiffeq.odeint_adjoint`` (or ``odeint`` with
  ``--baseline-gradient direct``) over the same concatsquash MLP written in plain PyTorch, divergence by
  autograd (FFJORD's ``divergence_bf`` / ``divergence_approx``).

The two trainers step alternately (iteration i of one, then of the other, order swapped every
iteration) so that machine load affects both alike. The demo prints and writes (under ``--out``,
default ``runs/demo``) ``demo.json`` -- time per iteration (median, mean), NFE forward/backward,
final test NLL with the exact trace, inverse error, speed-up -- and ``demo.png`` (data, model density
and samples of both models). The default run takes about two minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fastode.apps.train import _mix_seed

__all__ = ["main", "build_parser", "build_pair", "make_flow", "PlainConcatSquash", "run_demo", "Trainer"]


class PlainConcatSquash(nn.Module):
    """FFJORD's ODEnet in plain PyTorch: the layers (and state-dict keys) of
    :class:`fastode.nn.ConcatSquashMLP`, but only ``forward(t, z)``, so a CNF takes its divergence by
    autograd as FFJORD does (``divergence_bf`` for the exact trace, one VJP for Hutchinson)."""

    def __init__(self, dim, hidden=(64, 64, 64), activation="tanh"):
        super().__init__()
        from fastode.nn import ConcatSquashLinear

        self.dim, self.activation = int(dim), activation
        dims = (self.dim,) + tuple(hidden) + (self.dim,)
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, t, z):
        from fastode.nn.functional import concatsquash_mlp

        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(())
        return concatsquash_mlp(t, z, [layer.params() for layer in self.layers], self.activation)


def build_parser() -> argparse.ArgumentParser:
    from fastode.data import TOY_DATASETS
    from fastode.apps.train import ACTIVATION_CHOICES, GRADIENT_CHOICES, _dims

    p = argparse.ArgumentParser(
        prog="fastode demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a small CNF with fastode and with torchdiffeq (same weights, data, noise and solver) "
                    "and compare time per iteration, NFE and final NLL.")
    p.add_argument("--data", default="8gaussians", choices=TOY_DATASETS)
    p.add_argument("--niters", type=int, default=300, help="training iterations of each trainer")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--dims", type=_dims, default=(64, 64, 64))
    p.add_argument("--activation", default="tanh", choices=ACTIVATION_CHOICES)
    p.add_argument("--T", type=float, default=0.5, help="end time (learned, FFJORD's train_T)")
    p.add_argument("--method", default="dopri5")
    p.add_argument("--step-size", type=float, default=None, help="for fixed-grid methods")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--trace", default="exact", choices=("exact", "hutchinson"),
                   help="training divergence (FFJORD's toy default: exact)")
    p.add_argument("--gradient", default="direct", choices=GRADIENT_CHOICES, help="fastode's gradient mode")
    p.add_argument("--baseline-gradient", default="adjoint", choices=("adjoint", "direct"),
                   help="torchdiffeq: odeint_adjoint (FFJORD) or odeint (backprop through the solver)")
    p.add_argument("--kinetic", type=float, default=0.0, help="RNODE kinetic-energy weight")
    p.add_argument("--jacobian-frobenius", type=float, default=0.0, help="RNODE Jacobian-Frobenius weight")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--npts", type=int, default=120, help="density grid resolution per side in the PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for both trainers (0: torch's default); one thread suits this small "
                        "model and keeps the comparison stable on a busy machine")
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="results directory")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    return p


def make_flow(args, dim: int, library: str, gradient: str, nn_backend: str = "auto"):
    """One CNF (a one-block ``SequentialFlow``) as ``args`` describes it, on ``library``'s stack:
    ``"fastode"`` (:func:`fastode.odeint`, the concatsquash backend ``nn_backend``: fused kernels by default)
    or ``"torchdiffeq"`` (torchdiffeq's solvers, plain PyTorch MLP, autograd divergence). Evaluation: same
    method, exact trace, direct mode."""
    from fastode.flows import CNF, SequentialFlow, Solver, build_flow

    solver = Solver(method=args.method, rtol=args.rtol, atol=args.atol, step_size=args.step_size,
                    gradient=gradient, backend=library)
    regs = {k: w for k, w in (("kinetic", getattr(args, "kinetic", 0.0)),
                              ("jacobian_frobenius", getattr(args, "jacobian_frobenius", 0.0))) if w}
    common = dict(T=args.T, learn_T=True, trace=args.trace, eval_trace="exact", train_solver=solver,
                  eval_solver=solver.replace(gradient="direct"), regularizers=regs)
    if library == "fastode":
        return build_flow(dim, hidden=tuple(args.dims), activation=args.activation, num_blocks=1,
                          nn_backend=nn_backend, **common)
    if library == "torchdiffeq":
        return SequentialFlow([CNF(PlainConcatSquash(dim, args.dims, args.activation), **common)])
    raise ValueError(f"library must be 'fastode' or 'torchdiffeq', got {library!r}")


def build_pair(args, dim: int = 2):
    """``(fastode_flow, torchdiffeq_flow)`` with identical initial weights (seeded by ``args.seed``)."""
    torch.manual_seed(args.seed)
    fast = make_flow(args, dim, "fastode", args.gradient)
    base = make_flow(args, dim, "torchdiffeq", args.baseline_gradient)
    base.load_state_dict(fast.state_dict())
    return fast, base


class Trainer:
    """One model's optimiser and per-iteration records."""

    def __init__(self, name, flow, args):
        self.name, self.flow, self.args = name, flow, args
        self.opt = torch.optim.Adam(flow.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.times, self.nfe_f, self.nfe_b, self.losses = [], [], [], []

    def step(self, x, itr):
        from fastode.flows import density_loss

        gen = torch.Generator().manual_seed(_mix_seed(self.args.seed, itr, 99))  # same probes for both models
        t0 = time.perf_counter()
        self.flow.reset_nfe()
        self.opt.zero_grad(set_to_none=True)
        loss, _info = density_loss(self.flow, x, noise=gen)
        f = self.flow.nfe
        loss.backward()
        b = self.flow.nfe - f
        self.opt.step()
        self.times.append(time.perf_counter() - t0)
        self.nfe_f.append(f)
        self.nfe_b.append(b)
        self.losses.append(float(loss.detach()))

    def summary(self, test):
        flow = self.flow
        flow.eval()
        x = torch.as_tensor(test)
        try:
            t0 = time.perf_counter()
            flow.reset_nfe()
            with torch.no_grad():
                nll = float(-flow.log_prob(x).double().mean())
            eval_nfe, eval_time = flow.nfe, time.perf_counter() - t0
            with torch.no_grad():
                inv = float(flow.inverse_error(x[:1000]))
        finally:
            flow.train()
        return {
            "time_per_iteration_s_median": statistics.median(self.times),
            "time_per_iteration_s_mean": float(np.mean(self.times)),
            "train_time_s": float(np.sum(self.times)),
            "nfe_forward_mean": float(np.mean(self.nfe_f)),
            "nfe_backward_mean": float(np.mean(self.nfe_b)),
            "final_train_loss": float(np.mean(self.losses[-10:])),
            "test_nll_nats": nll,
            "test_eval_nfe": eval_nfe,
            "test_eval_time_s": eval_time,
            "inverse_error": inv,
            "T": float(flow.blocks[0].T.detach()),
        }


def run_demo(args) -> dict:
    from fastode.data import ToySampler, toy_sample

    if args.threads:
        torch.set_num_threads(args.threads)
    fast, base = build_pair(args)
    trainers = [Trainer("fastode", fast, args), Trainer("torchdiffeq", base, args)]
    test = toy_sample(args.data, args.test_size, seed=_mix_seed(args.seed, 1_000_002))
    bar = range(args.niters)
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"demo {args.data}", dynamic_ncols=True)
    wall0 = time.perf_counter()
    for itr in bar:
        x = torch.as_tensor(ToySampler(args.data, _mix_seed(args.seed, 0, itr))(args.batch_size))
        order = trainers if itr % 2 == 0 else trainers[::-1]
        for tr in order:
            tr.step(x, itr)
        if args.progress:
            f, b = trainers
            bar.set_postfix({"fastode": f"{f.losses[-1]:.3f} nfe {f.nfe_f[-1]}/{f.nfe_b[-1]} {f.times[-1] * 1e3:.0f}ms",
                             "torchdiffeq": f"{b.losses[-1]:.3f} nfe {b.nfe_f[-1]}/{b.nfe_b[-1]} "
                                            f"{b.times[-1] * 1e3:.0f}ms"}, refresh=False)
    wall = time.perf_counter() - wall0
    results = {tr.name: tr.summary(test) for tr in trainers}
    f, b = results["fastode"], results["torchdiffeq"]
    from fastode.flows.solver import resolve_backend

    report = {
        "problem": {"data": args.data, "niters": args.niters, "batch_size": args.batch_size, "dims": list(args.dims),
                    "activation": args.activation, "T0": args.T, "learn_T": True, "method": args.method,
                    "step_size": args.step_size, "rtol": args.rtol, "atol": args.atol, "trace": args.trace,
                    "test_size": args.test_size, "seed": args.seed},
        "fastode": {**f, "gradient": args.gradient, "solver": resolve_backend(fast.blocks[0].train_solver),
                    "nn_backend": getattr(fast.blocks[0].last_solve, "mlp_backend", None)},
        "torchdiffeq": {**b, "gradient": args.baseline_gradient,
                        "solver": "torchdiffeq." + ("odeint_adjoint" if args.baseline_gradient == "adjoint" else "odeint"),
                        "nn_backend": "plain PyTorch, autograd divergence"},
        "speedup_time_per_iteration_median": b["time_per_iteration_s_median"] / f["time_per_iteration_s_median"],
        "speedup_train_time": b["train_time_s"] / f["train_time_s"],
        "wall_time_s": wall,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    if args.plot:
        report["png"] = _plot(args, trainers, test)
    return report


def _versions() -> dict:
    from fastode.apps.train import _versions as v

    out = v()
    try:
        import torchdiffeq

        out["torchdiffeq"] = torchdiffeq.__version__
    except Exception:  # pragma: no cover
        out["torchdiffeq"] = None
    return out


def _plot(args, trainers, test) -> str:
    from fastode.apps.plots import density_grid, density_panel, new_figure, points_panel, save_figure

    fig = new_figure((12, 8))
    lo, hi = -4.0, 4.0
    for row, tr in enumerate(trainers):
        flow = tr.flow
        flow.eval()
        try:
            def log_prob(pts, flow=flow):
                with torch.no_grad():
                    return flow.log_prob(torch.as_tensor(pts)).double().numpy()

            _xs, _ys, dens = density_grid(log_prob, args.npts, lo, hi)
            with torch.no_grad():
                samples = flow.sample(20000, generator=torch.Generator().manual_seed(args.seed)).double().numpy()
        finally:
            flow.train()
        panels = [("data" if row == 0 else "time", test), ("density", dens), ("samples", samples)]
        for col, (kind, arr) in enumerate(panels):
            ax = fig.add_subplot(2, 3, row * 3 + col + 1)
            if kind == "time":
                for other in trainers:
                    ax.plot(np.arange(len(other.times) + 1), np.concatenate([[0.0], np.cumsum(other.times)]),
                            label=other.name)
                ax.set_xlabel("iteration")
                ax.set_ylabel("cumulative training time (s)")
                ax.legend()
                continue
            label = "data" if kind == "data" else f"{tr.name}: {kind}"
            if kind == "density":
                label += (f"\n{statistics.median(tr.times) * 1e3:.0f} ms/iter, NFE {np.mean(tr.nfe_f):.0f}+"
                          f"{np.mean(tr.nfe_b):.0f}")
                density_panel(ax, arr, lo, hi, label)
            else:
                points_panel(ax, arr, lo, hi, 150, label)
    fig.suptitle(f"{args.data}: {args.niters} iterations, {args.method} "
                 f"(rtol {args.rtol:g}, atol {args.atol:g}), same initial weights and data")
    return save_figure(fig, os.path.join(args.out, "demo.png"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.niters < 1:
        print("fastode demo: --niters must be >= 1", file=sys.stderr)
        return 2
    report = run_demo(args)
    f, b = report["fastode"], report["torchdiffeq"]
    rows = [("", "fastode", "torchdiffeq"),
            ("time / iteration (median)", f"{f['time_per_iteration_s_median'] * 1e3:.1f} ms",
             f"{b['time_per_iteration_s_median'] * 1e3:.1f} ms"),
            ("NFE forward / backward", f"{f['nfe_forward_mean']:.1f} / {f['nfe_backward_mean']:.1f}",
             f"{b['nfe_forward_mean']:.1f} / {b['nfe_backward_mean']:.1f}"),
            ("test NLL (nats, exact trace)", f"{f['test_nll_nats']:.4f}", f"{b['test_nll_nats']:.4f}"),
            ("inverse error", f"{f['inverse_error']:.2e}", f"{b['inverse_error']:.2e}"),
            ("total training time", f"{f['train_time_s']:.1f} s", f"{b['train_time_s']:.1f} s")]
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>14}  {r[2]:>14}")
    print(f"speed-up (median time per iteration): {report['speedup_time_per_iteration_median']:.2f}x; "
          f"results in {args.out}/demo.json" + (f" and {report['png']}" if report.get("png") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
