"""Batch-global vs per-tile vs per-row step control on a heterogeneous batch (fastode's ``cpp_adaptive`` engine).

Model: the trained 2-D toy CNF of bench_adaptive_cnf.py (concatsquash 2 -> 64 -> 64 -> 64 -> 2, tanh, T = 0.5,
float32, one thread); the task is the log-likelihood with dopri5 and the exact trace. The batch mixes two kinds of
rows, as an anomaly-scoring batch does: a quarter in-distribution points (eight Gaussians: the flow moves them
through its active region, about 45 evaluations per row alone at 1e-5) and three quarters out-of-distribution
queries (8 x a standard normal: the tanh units saturate there, the field is almost constant and a row alone takes
about 20). Batch-global control (torchdiffeq's) takes one step size for the batch and the RMS error over it, so
every row pays for the hard ones; per-tile (``CNF(step_control="per_tile", step_rows=k)``) gives each tile of k rows
its own step size; per-row is its limit (k = 1). The two kinds come in contiguous blocks (the batch as built from
two sources); ``shuffled`` repeats per-tile on a random permutation of the rows, where tiles mix both kinds.

Measured for each mode at each tolerance (rtol = atol): NFE per row (the row-weighted mean over tiles; batch-global:
the solve's NFE), wall time (median of interleaved repeats), and the error of log p(x) and of z(T) against a
reference solved in float64 at 1e-12 on the ``odeint`` engine (the per-stage path, checked against torchdiffeq in
the tests): the max over rows and the RMS. "At equal error" compares the NFE each mode needs for the same max error,
interpolated log-log along its tolerance sweep. A float32 solve cannot go below ~1e-6 in log p.

    python bench/bench_step_control.py           # -> bench/results/step_control.{json,md,png}
    python bench/bench_step_control.py --quick   # batch 256, two tolerances, no files
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_adaptive_cnf as adaptive  # noqa: E402
import bench_cpu_cnf as cpu  # noqa: E402
import common  # noqa: E402
from fastode.flows import CNF  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {"batch-global": ("batch", 64), "per-tile 64": ("per_tile", 64), "per-tile 8": ("per_tile", 8),
         "per-tile 8 shuffled": ("per_tile", 8), "per-row": ("per_row", 1)}


def heterogeneous_batch(n: int, seed: int = 0) -> torch.Tensor:
    """A quarter eight-Gaussian points, then three quarters far out-of-distribution queries."""
    g = torch.Generator().manual_seed(seed)
    n_in = n // 4
    return torch.cat([cpu.eight_gaussians(n_in, g), 8.0 * torch.randn(n - n_in, cpu.DIM, generator=g)])


def make_cnf(mlp, tol, mode, rows, dtype=torch.float32, engine="auto"):
    return CNF(copy.deepcopy(mlp).to(dtype), T=cpu.T_END, method="dopri5", rtol=tol, atol=tol, trace="hutchinson",
               eval_trace="exact", step_control=mode, step_rows=rows, engine=engine).eval()


def loglik_with_nfe(cnf, x):
    """``(log p(x), z(T), NFE per row, NFE per row for each row)``."""
    with torch.no_grad():
        out = cnf(x)
    z, lp = out.out, cpu.std_normal_logprob(out.out) + out.logdet
    st = cnf.last_stats
    if getattr(st, "tiles", None):
        rows = cnf.step_rows
        per_row = np.concatenate([np.full(min(rows, x.shape[0] - i * rows), t["nfe"]) for i, t in
                                  enumerate(st.tiles)])
    else:
        per_row = np.full(x.shape[0], st.num_fevals)
    return lp, z, float(per_row.mean()), per_row


def reference(mlp, x):
    cnf = make_cnf(mlp, 1e-12, "batch", 64, torch.float64, engine="odeint")
    lp, z, _, _ = loglik_with_nfe(cnf, x.double())
    return lp, z


def at_equal_error(sweep_a, sweep_b, key="nfe_per_row"):
    """Ratio b / a of ``key`` (NFE per row, or ms) at the max errors mode ``a`` reached, interpolating ``b``'s
    log-log in its error (None where ``a``'s error lies outside ``b``'s range)."""
    eb = np.log([r["err_logp_max"] for r in sweep_b])
    nb = np.log([r[key] for r in sweep_b])
    order = np.argsort(eb)
    out = []
    for r in sweep_a:
        ea = math.log(r["err_logp_max"])
        if not eb.min() <= ea <= eb.max():
            out.append(None)
            continue
        out.append(float(np.exp(np.interp(ea, eb[order], nb[order])) / r[key]))
    return out


def run(mlp, batch, tols, repeats, budget):
    x = heterogeneous_batch(batch)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(1))
    ref_lp, ref_z = reference(mlp, x)
    rows = []
    for tol in tols:
        fns, res = {}, {}
        for name, (mode, k) in MODES.items():
            cnf = make_cnf(mlp, tol, mode, k)
            xs = x[perm] if "shuffled" in name else x
            lp, z, nfe, per_row = loglik_with_nfe(cnf, xs)
            if "shuffled" in name:  # back to the batch's order
                inv = torch.argsort(perm)
                lp, z, per_row = lp[inv], z[inv], per_row[inv.numpy()]
            assert cnf.last_solve.engine == "cpp_adaptive", cnf.last_solve.describe()
            err_lp = (lp.double() - ref_lp).abs()
            err_z = (z.double() - ref_z).abs().amax(1)
            n_in = batch // 4
            res[name] = {"tol": tol, "mode": name, "nfe_per_row": nfe, "nfe_in": float(per_row[:n_in].mean()),
                         "nfe_out": float(per_row[n_in:].mean()), "err_logp_max": float(err_lp.max()),
                         "err_logp_rms": float(err_lp.pow(2).mean().sqrt()), "err_z_max": float(err_z.max()),
                         "err_logp_max_in": float(err_lp[:n_in].max()), "err_logp_max_out": float(err_lp[n_in:].max())}
            fns[name] = (lambda c=cnf, xs=xs: c(xs))
        with torch.no_grad():
            timing = common.time_alternating(fns, repeats=repeats, warmup=1, budget_s=budget)
        for name, tm in timing.items():
            res[name]["ms"] = 1e3 * tm.median
            res[name]["iqr_ms"] = [1e3 * q for q in tm.iqr]
        base = res["batch-global"]
        for r in res.values():
            r["nfe_vs_batch"] = r["nfe_per_row"] / base["nfe_per_row"]
            r["time_vs_batch"] = r["ms"] / base["ms"]
            rows.append(r)
            print(f"tol {tol:.0e} {r['mode']:22s} NFE/row {r['nfe_per_row']:6.1f} (x{r['nfe_vs_batch']:.2f}) "
                  f"{r['ms']:8.2f} ms (x{r['time_vs_batch']:.2f})  max|err log p| {r['err_logp_max']:.2e}",
                  flush=True)
    sweeps = {name: [r for r in rows if r["mode"] == name] for name in MODES}
    equal = {name: {key: at_equal_error(sweeps["batch-global"], sweeps[name], key) for key in ("nfe_per_row", "ms")}
             for name in MODES}
    return rows, equal


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name in MODES:
        rs = [r for r in rows if r["mode"] == name]
        ax[0].loglog([r["err_logp_max"] for r in rs], [r["nfe_per_row"] for r in rs], "o-", label=name)
        ax[1].loglog([r["err_logp_max"] for r in rs], [r["ms"] for r in rs], "o-", label=name)
    ax[0].set(xlabel="max |error of log p(x)|", ylabel="NFE per row", title="work per row")
    ax[1].set(xlabel="max |error of log p(x)|", ylabel="ms per log-likelihood", title="wall time (1 thread)")
    for a in ax:
        a.grid(True, which="both", alpha=0.3)
        a.invert_xaxis()
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ratio(x):
    return "" if x is None else f"{x:.2f}"


def report(rows, equal, batch, meta) -> str:
    lines = ["# Step control on a heterogeneous batch: batch-global vs per-tile vs per-row", "",
             __doc__.split("\n\n")[1], "", __doc__.split("\n\n")[2], "", f"Batch {batch}.", "",
             "| tol | mode | NFE / row | in-dist. | out-of-dist. | NFE x batch | NFE x batch at equal error | ms | "
             "time x batch | time x batch at equal error | max err log p | RMS err log p | max err z |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tols = sorted({r["tol"] for r in rows}, reverse=True)
    for name in MODES:
        for i, tol in enumerate(tols):
            r = next(r_ for r_ in rows if r_["mode"] == name and r_["tol"] == tol)
            eq_n, eq_t = (equal[name][k][i] for k in ("nfe_per_row", "ms"))
            lines.append(f"| {tol:.0e} | {name} | {r['nfe_per_row']:.1f} | {r['nfe_in']:.1f} | {r['nfe_out']:.1f} | "
                         f"{r['nfe_vs_batch']:.2f} | {_ratio(eq_n)} | {common.fmt(r['ms'])} | "
                         f"{r['time_vs_batch']:.2f} | {_ratio(eq_t)} | {r['err_logp_max']:.2e} | "
                         f"{r['err_logp_rms']:.2e} | {r['err_z_max']:.2e} |")
    lines += ["", "At equal error: the NFE (time) the mode needs for the max error of log p that batch-global reached "
              "at that tolerance, over batch-global's (log-log interpolation along the mode's sweep; empty outside "
              "it). In-dist. / out-of-dist.: NFE per row of the two kinds of rows.",
              "", "![work-precision](step_control.png)", "", common.metadata_markdown(meta)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of timed repeats per tolerance")
    ap.add_argument("--train-iters", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="batch 256, two tolerances, 3 repeats; no files")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.tols, args.repeats, args.budget, args.train_iters = 256, [1e-3, 1e-5], 3, 2.0, 50
    common.pin_threads(1)
    mlp = adaptive.trained_mlp(args.train_iters)
    rows, equal = run(mlp, args.batch, args.tols, args.repeats, args.budget)
    meta = common.metadata(batch=args.batch, train_iters=args.train_iters)
    if not args.quick:
        common.write_json(RESULTS / "step_control.json", {"meta": meta, "rows": rows, "at_equal_error": equal})
        plot(rows, RESULTS / "step_control.png")
        common.write_text(RESULTS / "step_control.md", report(rows, equal, args.batch, meta))
        print(f"wrote {RESULTS / 'step_control.md'}")


if __name__ == "__main__":
    main()
