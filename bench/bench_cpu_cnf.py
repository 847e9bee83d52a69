"""CPU benchmark of a 2-D FFJORD CNF: fastode's C++ backend vs torchdiffeq on the same model.

Model: concatsquash MLP 2 -> 64 -> 64 -> 64 -> 2, tanh (FFJORD's toy model), T = 0.5, float32, one thread.

* training iteration: rk4 (3/8 rule, torchdiffeq's "rk4") with step 0.05 over [0, T] (10 steps, 40 MLP
  evaluations), Hutchinson trace with Gaussian noise fixed over the solve, loss = mean NLL, backward
  through the discrete solve, Adam step;
* inference log-likelihood: dopri5 with rtol = atol = 1e-5 and the exact trace (2-D), no gradient.

Peers, on the same weights (one state dict) and the same noise:

* ``torchdiffeq``: ``torchdiffeq.odeint`` over FFJORD's ODE function: FFJORD's own ``ConcatSquashLinear``
  layers (``nn.Linear`` modules, forward verbatim) and the trace from ``torch.autograd.grad``, as FFJORD
  computes it;
* ``odeint per-stage``: ``fastode.odeint`` over an ODE function calling ``ConcatSquashMLP.forward_with_trace``
  (one fused C++ call per stage; fastode's solver loop in Python) -- what ``fastode.flows.CNF`` runs when its
  fused grid path does not apply (adaptive methods, ``fused_cpu=False``; see fastode/flows/fused/);
* ``fastode``: :class:`fastode.cpp.CnfStepper` -- training: the whole rk4 grid in one fused C++ call and
  one for its backward (:meth:`~fastode.cpp.CnfStepper.solve`; the CNF's default path for such solves);
  inference: one fused call per dopri5 step (:meth:`~fastode.cpp.CnfStepper.step`) inside torchdiffeq's
  step-size control (same initial step, controller and end-point interpolation, so the same steps; the NFE is
  recorded for both).

Timing: medians of repeated runs, peers interleaved (bench/common.py), machine load recorded. The matmul
floor is the FLOP count of the GEMMs an iteration needs at the GEMM rate measured on this machine for the
same shapes (``torch.mm``, one thread).

    python bench/bench_cpu_cnf.py                 # batches 128, 1024, 4096 -> bench/results/cpu_cnf.{json,md}
    python bench/bench_cpu_cnf.py --quick         # smaller repeat counts, no files written
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

import common  # noqa: E402
import fastode.cpp as fc  # noqa: E402
from fastode.nn import ConcatSquashMLP  # noqa: E402
from fastode.tableaus import get_tableau  # noqa: E402

T_END = 0.5
STEP = 0.05
HIDDEN = (64, 64, 64)
DIM = 2
LOG2PI = math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------------ data
def eight_gaussians(n: int, gen: torch.Generator) -> torch.Tensor:
    centers = torch.tensor([(1, 0), (-1, 0), (0, 1), (0, -1), (1 / math.sqrt(2), 1 / math.sqrt(2)),
                            (1 / math.sqrt(2), -1 / math.sqrt(2)), (-1 / math.sqrt(2), 1 / math.sqrt(2)),
                            (-1 / math.sqrt(2), -1 / math.sqrt(2))]) * 4.0
    idx = torch.randint(0, 8, (n,), generator=gen)
    return (centers[idx] + 0.5 * torch.randn(n, 2, generator=gen)) / 1.414


def std_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG2PI


# ------------------------------------------------------------------------------------------- torchdiffeq
class FFJORDConcatSquashLinear(torch.nn.Module):
    """FFJORD's ConcatSquashLinear (lib/layers/diffeq_layers/basic.py), forward verbatim."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = torch.nn.Linear(dim_in, dim_out)
        self._hyper_bias = torch.nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = torch.nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(1, 1))) + self._hyper_bias(t.view(1, 1))


class FFJORDODEnet(torch.nn.Module):
    """FFJORD's ODEnet for concatsquash layers with tanh (the torchdiffeq peer's model).

    Its state dict has the same keys as :class:`fastode.nn.ConcatSquashMLP`, so both load the same weights.
    """

    def __init__(self, mlp: ConcatSquashMLP):
        super().__init__()
        dims = (mlp.dim,) + mlp.hidden + (mlp.dim,)
        self.layers = torch.nn.ModuleList(FFJORDConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.load_state_dict(mlp.state_dict())

    def forward(self, t, z):
        for i, layer in enumerate(self.layers):
            z = layer(t, z)
            if i < len(self.layers) - 1:
                z = torch.tanh(z)
        return z


class FFJORDFunc(torch.nn.Module):
    """FFJORD's ODE function: state (z, -int trace); trace by autograd (Hutchinson with e, or exact)."""

    def __init__(self, mlp: torch.nn.Module, e: torch.Tensor | None):
        super().__init__()
        self.mlp, self.e, self.nfe = mlp, e, 0

    def forward(self, t, states):
        self.nfe += 1
        z = states[0]
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            f = self.mlp(t, z)
            if self.e is not None:
                vjp = torch.autograd.grad(f, z, self.e, create_graph=create)[0]
                div = (vjp * self.e).sum(1)
            else:
                div = sum(torch.autograd.grad(f[:, i].sum(), z, create_graph=create, retain_graph=True)[0][:, i]
                          for i in range(z.shape[1]))
        return f, -div.unsqueeze(1)


def td_train_iter(mlp, opt, x, e):
    import torchdiffeq
    func = FFJORDFunc(mlp, e)
    z, dlogp = torchdiffeq.odeint(func, (x, torch.zeros(x.shape[0], 1)), torch.tensor([0.0, T_END]),
                                  method="rk4", options={"step_size": STEP})
    loss = -(std_normal_logprob(z[-1]) - dlogp[-1][:, 0]).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), func.nfe


def td_loglik(mlp, x):
    import torchdiffeq
    func = FFJORDFunc(mlp, None)
    with torch.no_grad():
        z, dlogp = torchdiffeq.odeint(func, (x, torch.zeros(x.shape[0], 1)), torch.tensor([0.0, T_END]),
                                      method="dopri5", rtol=1e-5, atol=1e-5)
    return std_normal_logprob(z[-1]) - dlogp[-1][:, 0], func.nfe


# ---------------------------------------------------------------------------------------------- fastode
def rk4_grid(t0: float, t1: float, step: float) -> list[float]:
    """torchdiffeq's fixed grid for ``step_size`` (the last point clipped to t1)."""
    n = math.ceil((t1 - t0) / step + 1)
    ts = [t0 + i * step for i in range(n)]
    ts[-1] = t1
    return ts


def fo_train_iter(mlp, opt, x, e):
    stepper = fc.CnfStepper(mlp, "rk4")  # one per solve
    ts = rk4_grid(0.0, T_END, STEP)
    z, q = stepper.solve(ts, x, torch.zeros(x.shape[0], 1), e)  # the 10 steps: one C++ call each way
    loss = -(std_normal_logprob(z) - q[:, 0]).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), 4 * (len(ts) - 1)


class PerStageFunc(torch.nn.Module):
    """ODE function for fastode.odeint: each stage one fused C++ call (``forward_with_trace``)."""

    def __init__(self, mlp: ConcatSquashMLP, e: torch.Tensor | None):
        super().__init__()
        self.mlp, self.e, self.nfe = mlp, e, 0

    def forward(self, t, states):
        self.nfe += 1
        f, trace, _, _ = self.mlp.forward_with_trace(t, states[0], self.e, exact=self.e is None)
        return f, -trace.unsqueeze(1)


def fo_odeint_train_iter(mlp, opt, x, e):
    import fastode
    func = PerStageFunc(mlp, e)
    z, dlogp = fastode.odeint(func, (x, torch.zeros(x.shape[0], 1)), torch.tensor([0.0, T_END]), method="rk4",
                              options={"step_size": STEP})
    loss = -(std_normal_logprob(z[-1]) - dlogp[-1][:, 0]).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), func.nfe


def fo_odeint_loglik(mlp, x):
    import fastode
    func = PerStageFunc(mlp, None)
    with torch.no_grad():
        z, dlogp = fastode.odeint(func, (x, torch.zeros(x.shape[0], 1)), torch.tensor([0.0, T_END]),
                                  method="dopri5", rtol=1e-5, atol=1e-5)
    return std_normal_logprob(z[-1]) - dlogp[-1][:, 0], func.nfe


def _mixed_norm(parts):
    return max(p.pow(2).mean().sqrt() for p in parts)


def _dopri5_interp(tab, y0, y1, kz, dt, theta):
    """torchdiffeq's quartic interpolant of a dopri5 step (coefficients c_mid from the tableau)."""
    ymid = y0 + dt * sum(c * k for c, k in zip(tab.c_mid, kz))
    # torchdiffeq's _interp_fit / _interp_evaluate
    a_ = -2 * dt * kz[0] + 2 * dt * kz[-1] - 8 * y0 - 8 * y1 + 16 * ymid
    b_ = 5 * dt * kz[0] - 3 * dt * kz[-1] + 18 * y0 + 14 * y1 - 32 * ymid
    c_ = -4 * dt * kz[0] + dt * kz[-1] - 11 * y0 - 5 * y1 + 16 * ymid
    d_ = dt * kz[0]
    e_ = y0
    return e_ + theta * (d_ + theta * (c_ + theta * (b_ + theta * a_)))


def fo_loglik(mlp, x, rtol=1e-5, atol=1e-5):
    """dopri5 with torchdiffeq's controller (initial step, safety 0.9, factors 0.2 / 10, mixed RMS norm over
    (z, logp), step past T and interpolate), each step one fused C++ call (exact trace, FSAL)."""
    tab = get_tableau("dopri5")
    B = x.shape[0]
    with torch.no_grad():
        stepper = fc.CnfStepper(mlp, tab, atol=atol, rtol=rtol)
        z, q = x, torch.zeros(B, 1)
        f0, tr0 = fc.concatsquash_mlp_exact_trace(torch.tensor(0.0), z, mlp.params(), mlp.activation)
        kq0 = -tr0.unsqueeze(1)
        nfe = 1
        # torchdiffeq's _select_initial_step (order - 1 = 4)
        d0 = _mixed_norm([z / (atol + z.abs() * rtol), q / (atol + q.abs() * rtol)])
        d1 = _mixed_norm([f0 / (atol + z.abs() * rtol), kq0 / (atol + q.abs() * rtol)])
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else float(0.01 * d0 / d1)
        f1, tr1 = fc.concatsquash_mlp_exact_trace(torch.tensor(h0), z + h0 * f0, mlp.params(), mlp.activation)
        nfe += 1
        d2 = float(_mixed_norm([(f1 - f0) / (atol + z.abs() * rtol),
                                (-tr1.unsqueeze(1) - kq0) / (atol + q.abs() * rtol)])) / h0
        h1 = max(1e-6, h0 * 1e-3) if (d1 <= 1e-15 and d2 <= 1e-15) else (0.01 / max(float(d1), d2)) ** (1 / 5)
        dt = min(100 * h0, h1)
        t = 0.0
        kz, kq = f0, kq0
        D = z.shape[1]
        while True:
            r = stepper.step(t, dt, z, q, None, kz, kq, return_stages=True)
            nfe += 6
            ss = r.error_sumsq
            ratio = max(math.sqrt(float(ss[:D].sum()) / (B * D)), math.sqrt(float(ss[D:].sum()) / B))
            if ratio <= 1:
                t_new = t + dt
                if t_new >= T_END:  # interpolate inside the step that passed T (torchdiffeq's _advance)
                    theta = (T_END - t) / dt
                    zT = _dopri5_interp(tab, z, r.z1, list(r.kz), dt, theta)
                    qT = _dopri5_interp(tab, q, r.q1, list(r.kq), dt, theta)
                    return std_normal_logprob(zT) - qT[:, 0], nfe
                t, z, q, kz, kq = t_new, r.z1, r.q1, r.kz[-1], r.kq[-1]
            factor = 10.0 if ratio == 0 else min(10.0, max(0.9 / ratio ** 0.2, 1.0 if ratio < 1 else 0.2))
            dt = dt * factor


# ------------------------------------------------------------------------------------------------ floor
def gemm_rate(batch: int, repeats: int = 50) -> float:
    """GEMM FLOP/s of torch.mm on the hidden-layer shape (batch x 64 x 64), one thread."""
    a, w = torch.randn(batch, 64), torch.randn(64, 64)
    out = torch.empty(batch, 64)
    for _ in range(5):
        torch.mm(a, w, out=out)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, w, out=out)
        samples.append((time.perf_counter() - t0) / 10)
    samples.sort()
    return 2 * batch * 64 * 64 / samples[len(samples) // 2]


def mlp_gemm_flops(batch: int) -> float:
    """FLOPs of the matrix products of one MLP evaluation (forward)."""
    dims = (DIM,) + HIDDEN + (DIM,)
    return 2.0 * batch * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def train_floor_flops(batch: int) -> float:
    # per stage: forward + VJP (2 products per layer) and their backward (4 per layer): 6 x forward
    return 4 * round(T_END / STEP) * 6 * mlp_gemm_flops(batch)


def loglik_floor_flops(batch: int, nfe: int) -> float:
    # per evaluation: forward + one VJP per probe (exact trace: D probes)
    return nfe * (1 + DIM) * mlp_gemm_flops(batch)


# ------------------------------------------------------------------------------------------------- main
def check_same_results(batch: int) -> dict:
    """Both peers on identical weights/noise: loss, parameter gradients and log-likelihoods agree."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = ConcatSquashMLP(DIM, HIDDEN, "tanh")
    twin = FFJORDODEnet(mlp)
    x, e = eight_gaussians(batch, gen), torch.randn(batch, DIM, generator=gen)
    opt_a = torch.optim.SGD(mlp.parameters(), lr=0.0)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.0)
    la, _ = fo_train_iter(mlp, opt_a, x, e)
    lb, _ = td_train_iter(twin, opt_b, x, e)
    gdiff = max(float((p.grad - q.grad).abs().max() / q.grad.abs().max())
                for p, q in zip(mlp.parameters(), twin.parameters()))
    lla, nfa = fo_loglik(mlp, x)
    llb, nfb = td_loglik(twin, x)
    return {"batch": batch, "loss_fastode": float(la), "loss_torchdiffeq": float(lb),
            "loss_rel_diff": abs(float(la - lb)) / abs(float(lb)), "grad_max_rel_diff": gdiff,
            "loglik_max_abs_diff": float((lla - llb).abs().max()), "nfe_loglik_fastode": nfa,
            "nfe_loglik_torchdiffeq": nfb}


def bench_batch(batch: int, repeats: int, budget_s: float) -> list[dict]:
    gen = torch.Generator().manual_seed(batch)
    torch.manual_seed(batch)
    mlp = ConcatSquashMLP(DIM, HIDDEN, "tanh")
    twin = FFJORDODEnet(mlp)  # FFJORD's own layer code, same weights
    x, e = eight_gaussians(batch, gen), torch.randn(batch, DIM, generator=gen)
    opt_f = torch.optim.Adam(mlp.parameters(), lr=1e-4)
    opt_t = torch.optim.Adam(twin.parameters(), lr=1e-4)
    nfe = {}

    def run(name, fn):
        def go():
            out = fn()
            nfe[name] = out[1]
        return go

    rows = []
    rate = gemm_rate(batch)
    per_stage = copy.deepcopy(mlp)  # fastode.odeint + the C++ MLP per stage (the CNF's default path today)
    opt_p = torch.optim.Adam(per_stage.parameters(), lr=1e-4)
    train = common.time_alternating({
        "fastode": run("train_fastode", lambda: fo_train_iter(mlp, opt_f, x, e)),
        "torchdiffeq": run("train_torchdiffeq", lambda: td_train_iter(twin, opt_t, x, e)),
        "odeint": run("train_odeint", lambda: fo_odeint_train_iter(per_stage, opt_p, x, e)),
    }, repeats=repeats, warmup=1, budget_s=budget_s)
    floor = train_floor_flops(batch) / rate
    rows.append({"task": "train rk4 (Hutchinson)", "batch": batch,
                 "fastode_ms": 1e3 * train["fastode"].median, "torchdiffeq_ms": 1e3 * train["torchdiffeq"].median,
                 "speedup": train["torchdiffeq"].median / train["fastode"].median, "floor_ms": 1e3 * floor,
                 "fastode_floor_frac": floor / train["fastode"].median,
                 "torchdiffeq_floor_frac": floor / train["torchdiffeq"].median,
                 "nfe_fastode": nfe["train_fastode"], "nfe_torchdiffeq": nfe["train_torchdiffeq"],
                 "odeint_per_stage_ms": 1e3 * train["odeint"].median,
                 "odeint_speedup": train["torchdiffeq"].median / train["odeint"].median,
                 "repeats": len(train["fastode"].samples), "gemm_gflops": rate / 1e9})
    infer = common.time_alternating({
        "fastode": run("ll_fastode", lambda: fo_loglik(mlp, x)),
        "torchdiffeq": run("ll_torchdiffeq", lambda: td_loglik(twin, x)),
        "odeint": run("ll_odeint", lambda: fo_odeint_loglik(per_stage, x)),
    }, repeats=repeats, warmup=1, budget_s=budget_s)
    floor_f = loglik_floor_flops(batch, nfe["ll_fastode"]) / rate
    floor_t = loglik_floor_flops(batch, nfe["ll_torchdiffeq"]) / rate
    rows.append({"task": "log-likelihood dopri5 1e-5 (exact trace)", "batch": batch,
                 "fastode_ms": 1e3 * infer["fastode"].median, "torchdiffeq_ms": 1e3 * infer["torchdiffeq"].median,
                 "speedup": infer["torchdiffeq"].median / infer["fastode"].median, "floor_ms": 1e3 * floor_f,
                 "fastode_floor_frac": floor_f / infer["fastode"].median,
                 "torchdiffeq_floor_frac": floor_t / infer["torchdiffeq"].median,
                 "nfe_fastode": nfe["ll_fastode"], "nfe_torchdiffeq": nfe["ll_torchdiffeq"],
                 "odeint_per_stage_ms": 1e3 * infer["odeint"].median,
                 "odeint_speedup": infer["torchdiffeq"].median / infer["odeint"].median,
                 "repeats": len(infer["fastode"].samples), "gemm_gflops": rate / 1e9})
    return rows


COLUMNS = {"task": "task", "batch": "batch", "torchdiffeq_ms": "torchdiffeq ms", "fastode_ms": "fastode ms",
           "speedup": "speedup", "odeint_per_stage_ms": "odeint per-stage ms", "odeint_speedup": "per-stage speedup",
           "floor_ms": "matmul floor ms", "fastode_floor_frac": "fastode % of floor",
           "torchdiffeq_floor_frac": "torchdiffeq % of floor", "nfe_fastode": "NFE fastode",
           "nfe_torchdiffeq": "NFE torchdiffeq"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per batch size and task (min 3 repeats)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, no files written")
    ap.add_argument("--out", default=str(common.RESULTS_DIR / "cpu_cnf"))
    args = ap.parse_args(argv)
    if not fc.available():
        raise SystemExit(f"the C++ backend is not built: {fc.build_info()['error']}")
    common.pin_threads(1)
    load_before = common.loadavg()
    check = check_same_results(256)
    print("same results:", check, flush=True)
    rows = []
    for batch in args.batches:
        rows += bench_batch(batch, 3 if args.quick else args.repeats, args.budget)
        for r in rows[-2:]:
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    meta = common.metadata(load_before=load_before, load_after=common.loadavg(), cpp=fc.build_info())
    if args.quick:
        return rows
    common.write_json(args.out + ".json", {"meta": meta, "check": check, "rows": rows})
    pct = {"fastode_floor_frac", "torchdiffeq_floor_frac"}
    table = common.markdown_table(
        [{k: (f"{100 * v:.0f}%" if k in pct else v) for k, v in r.items()} for r in rows], COLUMNS)
    text = ("# CPU CNF benchmark (fastode C++ backend vs torchdiffeq)\n\n" + (__doc__ or "") + "\n\n" + table
            + "\n\nSame weights and noise, checked before timing: " + str(check) + "\n\n"
            + common.metadata_markdown(meta) + "\n")
    common.write_text(args.out + ".md", text)
    return rows


if __name__ == "__main__":
    main()
