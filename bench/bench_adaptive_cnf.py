"""Adaptive CNF solves on the CPU: fastode's fused C++ engines vs fastode's per-stage path, torchdiffeq and diffrax.

Model: FFJORD's 2-D toy CNF (concatsquash 2 -> 64 -> 64 -> 64 -> 2, tanh, T = 0.5), float32, one thread, the same
weights in every framework: trained here first (``--train-iters`` Adam iterations of rk4 h = 0.05 on eight
Gaussians, seeded), so that dopri5 takes a realistic number of steps. Tasks, at each batch size:

* ``loglik``: the log-likelihood with dopri5, rtol = atol = 1e-5, the exact trace, no gradient;
* ``train``: a training iteration with dopri5 1e-5 and a Hutchinson trace (Gaussian probe fixed over the solve):
  mean NLL, backward through the discrete solve, an Adam step.

Peers:

* ``fastode``: ``fastode.flows.CNF`` (engine ``"auto"``: the whole adaptive solve, and its discrete adjoint, in C++:
  engine ``cpp_adaptive``);
* ``fastode per-stage``: the same CNF with ``engine="odeint"`` (``fastode.odeint``, one fused C++ network call per
  stage, the solver loop in Python);
* ``torchdiffeq``: ``torchdiffeq.odeint`` over FFJORD's own layers and autograd trace (bench_cpu_cnf.py);
* ``diffrax``: ``diffrax.diffeqsolve`` (``Dopri5``, ``PIDController`` at the same tolerances, jit-compiled, JAX on
  the CPU with one thread; backward by its default ``RecursiveCheckpointAdjoint``; Adam written out). Skipped
  with a note when JAX / diffrax are not installed (``pip install jax diffrax``: a benchmark-only dependency).
  Its controller's norm is the RMS over the whole state (torchdiffeq's is the max of per-tensor RMS), so its
  steps differ somewhat; the steps are reported for every peer.

Timing: medians of interleaved repeats (bench/common.py), machine load recorded. The matmul floor of a log-
likelihood is its GEMM FLOPs at the GEMM rate measured here (bench_cpu_cnf.py).

    python bench/bench_adaptive_cnf.py            # batches 128, 1024, 4096 -> bench/results/adaptive_cnf.{json,md}
    python bench/bench_adaptive_cnf.py --quick    # batch 128, few repeats, no files written
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import torch  # noqa: E402

import bench_cpu_cnf as cpu  # noqa: E402
import common  # noqa: E402
from fastode.flows import CNF  # noqa: E402
from fastode.nn import ConcatSquashMLP  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOL = 1e-5


def trained_mlp(iters: int, seed: int = 0) -> ConcatSquashMLP:
    """Weights trained on eight Gaussians (rk4 h = 0.05, Hutchinson, Adam 1e-3, batch 256) on the fused grid path."""
    torch.manual_seed(seed)
    mlp = ConcatSquashMLP(cpu.DIM, cpu.HIDDEN, "tanh")
    cnf = CNF(mlp, T=cpu.T_END, method="rk4", step_size=cpu.STEP).train()
    opt = torch.optim.Adam(cnf.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(iters):
        x = cpu.eight_gaussians(256, gen)
        loss = -cnf.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mlp


# ------------------------------------------------------------------------------------------------ fastode
def fastode_tasks(mlp, x, e, engine):
    cnf = CNF(copy.deepcopy(mlp), T=cpu.T_END, method="dopri5", rtol=TOL, atol=TOL, trace="hutchinson",
              eval_trace="exact", engine=engine)
    opt = torch.optim.Adam(cnf.parameters(), lr=1e-4)

    def loglik():
        cnf.eval()
        with torch.no_grad():
            cnf.log_prob(x)
        return cnf.last_stats.num_fevals, cnf.last_solve.engine

    def train():
        cnf.train()
        loss = -cnf.log_prob(x, noise=e).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return cnf.last_stats.num_fevals, cnf.last_solve.engine
    return loglik, train


# ------------------------------------------------------------------------------------------------ torchdiffeq
def torchdiffeq_tasks(mlp, x, e):
    import torchdiffeq

    net = cpu.FFJORDODEnet(mlp)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    t = torch.tensor([0.0, cpu.T_END])

    def loglik():
        return cpu.td_loglik(net, x)[1], "torchdiffeq"

    def train():
        func = cpu.FFJORDFunc(net, e)
        z, dlogp = torchdiffeq.odeint(func, (x, torch.zeros(x.shape[0], 1)), t, method="dopri5", rtol=TOL, atol=TOL)
        loss = -(cpu.std_normal_logprob(z[-1]) - dlogp[-1][:, 0]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return func.nfe, "torchdiffeq"
    return loglik, train


# ------------------------------------------------------------------------------------------------ diffrax
def diffrax_tasks(mlp, x, e):
    """``(loglik, train, versions)`` in JAX / diffrax, or ``None`` with the reason when they are not installed."""
    try:
        import diffrax
        import jax
        import jax.numpy as jnp
    except Exception as exc:  # a benchmark-only dependency
        return None, f"diffrax is not installed ({type(exc).__name__}: {exc}); pip install jax diffrax"

    params = [tuple(jnp.asarray(p.detach().numpy()) for p in layer) for layer in mlp.params()]
    L = len(params)

    def f(p, t, z):
        h = z
        for i, (W, b, gw, gb, bw) in enumerate(p):
            h = (h @ W.T + b) * jax.nn.sigmoid(gw * t + gb) + bw * t
            if i < L - 1:
                h = jnp.tanh(h)
        return h

    def exact_vf(t, y, p):
        z, _ = y
        fz = f(p, t, z)
        tr = 0.0
        for i in range(z.shape[1]):  # the exact trace: one forward-mode product per dimension
            v = jnp.zeros_like(z).at[:, i].set(1.0)
            tr = tr + jax.jvp(lambda zz: f(p, t, zz), (z,), (v,))[1][:, i]
        return fz, -tr

    def hutch_vf(t, y, args):
        p, ee = args
        z, _ = y
        fz, pull = jax.vjp(lambda zz: f(p, t, zz), z)
        return fz, -(pull(ee)[0] * ee).sum(1)

    def solve(vf, y0, args):
        return diffrax.diffeqsolve(diffrax.ODETerm(vf), diffrax.Dopri5(), 0.0, cpu.T_END, None, y0, args=args,
                                   stepsize_controller=diffrax.PIDController(rtol=TOL, atol=TOL),
                                   saveat=diffrax.SaveAt(t1=True), max_steps=10000)

    def nll(z, dlogp):
        return -(-0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * jnp.log(2 * jnp.pi) - dlogp).mean()

    xj, ej = jnp.asarray(x.numpy()), jnp.asarray(e.numpy())
    y0 = (xj, jnp.zeros(x.shape[0]))

    @jax.jit
    def loglik_fn(p):
        sol = solve(exact_vf, y0, p)
        return sol.ys[0][-1], sol.stats["num_steps"]

    def loss_fn(p):
        sol = solve(hutch_vf, y0, (p, ej))
        return nll(sol.ys[0][-1], sol.ys[1][-1]), sol.stats["num_steps"]

    lr, b1, b2, eps = 1e-4, 0.9, 0.999, 1e-8

    @jax.jit
    def train_fn(p, m, v, k):
        (loss, steps), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        m = jax.tree_util.tree_map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree_util.tree_map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
        p = jax.tree_util.tree_map(lambda p_, m_, v_: p_ - lr * (m_ / (1 - b1 ** k)) / (jnp.sqrt(v_ / (1 - b2 ** k))
                                                                                      + eps), p, m, v)
        return p, m, v, steps

    state = {"p": params, "m": jax.tree_util.tree_map(jnp.zeros_like, params),
             "v": jax.tree_util.tree_map(jnp.zeros_like, params), "k": 0}

    def loglik():
        z, steps = loglik_fn(params)
        z.block_until_ready()
        return 6 * int(steps) + 2, "diffrax"  # dopri5 (FSAL): 6 per step attempt, + the first stage and trial

    def train():
        state["k"] += 1
        p, m, v, steps = train_fn(state["p"], state["m"], state["v"], float(state["k"]))
        jax.tree_util.tree_leaves(p)[0].block_until_ready()
        state.update(p=p, m=m, v=v)
        return 6 * int(steps) + 2, "diffrax"
    return (loglik, train), f"jax {jax.__version__}, diffrax {diffrax.__version__}"


# ------------------------------------------------------------------------------------------------ run
def bench_batch(mlp, batch, repeats, budget_s):
    gen = torch.Generator().manual_seed(batch)
    x = cpu.eight_gaussians(batch, gen)
    e = torch.randn(batch, cpu.DIM, generator=gen)
    peers = {"fastode": fastode_tasks(mlp, x, e, "auto"),
             "fastode per-stage": fastode_tasks(mlp, x, e, "odeint"),
             "torchdiffeq": torchdiffeq_tasks(mlp, x, e)}
    dx, note = diffrax_tasks(mlp, x, e)
    if dx is not None:
        peers["diffrax"] = dx
    rows = []
    for k, task in enumerate(("loglik", "train")):
        fns = {name: fs[k] for name, fs in peers.items()}
        info = {name: fn() for name, fn in fns.items()}  # warm-up (jit compile) and the NFE / engine
        timing = common.time_alternating(fns, repeats=repeats, warmup=1, budget_s=budget_s)
        for name, tm in timing.items():
            nfe, engine = info[name]
            rows.append({"task": task, "batch": batch, "peer": name, "engine": engine, "nfe": nfe,
                         "ms": 1e3 * tm.median, "iqr_ms": [1e3 * q for q in tm.iqr], "repeats": len(tm.samples)})
        base = next(r["ms"] for r in rows if r["task"] == task and r["batch"] == batch and r["peer"] == "fastode")
        for r in rows:
            if r["task"] == task and r["batch"] == batch:
                r["vs_fastode"] = r["ms"] / base
    ll = next(r for r in rows if r["task"] == "loglik" and r["peer"] == "fastode")
    ll["floor_share"] = cpu.loglik_floor_flops(batch, ll["nfe"]) / cpu.gemm_rate(batch) / (ll["ms"] * 1e-3)
    return rows, note


def report(rows, meta, note) -> str:
    lines = ["# Adaptive CNF solves on the CPU: fastode's fused C++ engines vs per-stage, torchdiffeq, diffrax", "",
             __doc__.split("\n\n")[1], "", __doc__.split("\n\n")[2], "",
             "| task | batch | peer | engine | NFE | ms (median) | x fastode | GEMM floor share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{100 * r['floor_share']:.0f}%" if "floor_share" in r else ""
        lines.append(f"| {r['task']} | {r['batch']} | {r['peer']} | {r['engine']} | {r['nfe']} | "
                     f"{common.fmt(r['ms'])} | {r['vs_fastode']:.2f} | {share} |")
    lines += ["", "x fastode: the peer's time over fastode's in the same run (> 1: fastode is faster). diffrax NFE: "
              "6 per step attempt + 2, from its step count.", ""]
    if note:
        lines += [f"diffrax: {note}", ""]
    lines += [common.metadata_markdown(meta)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--budget", type=float, default=40.0, help="seconds of timed repeats per task and batch")
    ap.add_argument("--train-iters", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="batch 128, 3 repeats, 50 training iterations; no files")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.budget, args.train_iters = [128], 3, 5.0, 50
    common.pin_threads(1)
    mlp = trained_mlp(args.train_iters)
    rows, note = [], None
    for batch in args.batches:
        got, note = bench_batch(mlp, batch, args.repeats, args.budget)
        rows += got
        for r in got:
            print(f"{r['task']:6s} B={r['batch']:5d} {r['peer']:18s} {r['engine']:12s} NFE {r['nfe']:4d} "
                  f"{r['ms']:9.3f} ms  x{r['vs_fastode']:.2f}", flush=True)
    meta = common.metadata(train_iters=args.train_iters, diffrax=note)
    if not args.quick:
        common.write_json(RESULTS / "adaptive_cnf.json", {"meta": meta, "rows": rows})
        common.write_text(RESULTS / "adaptive_cnf.md", report(rows, meta, note))
        print(f"wrote {RESULTS / 'adaptive_cnf.md'}")


if __name__ == "__main__":
    main()
