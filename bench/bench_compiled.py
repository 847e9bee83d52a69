"""The compiled engine (``odeint(..., compile=True)``) against the eager loop and the reference solvers.

Issue "Fused stepping for the user's own dynamics" asked for: small ODEs (Van der Pol, Lotka-Volterra, a Kepler
orbit, a 20-D linear system, torchdiffeq's cubic-spiral demo), a neural ODE forward and training step at two
sizes, against scipy RK45 / DOP853 (NumPy right-hand sides), torchdiffeq, torchode and diffrax (JAX, jit; when
installed), plus the cold and warm compile times. Everything is float64 for the small ODEs (dopri5, rtol = atol =
1e-6, one output at the end) and float32 for the neural ODEs (dopri5, rtol = atol = 1e-5 on [0, 1]); one thread;
peers interleaved (``common.time_alternating``), medians. Warm numbers: the compiled program is built before
timing. The compile times are measured in fresh subprocesses: "cold" with an empty inductor cache directory,
"warm" a second process on the same directory (torch's on-disk caches).

    python bench/bench_compiled.py            # -> bench/results/compiled.json, compiled.md
    python bench/bench_compiled.py --quick    # fewer repeats, no compile-time subprocesses
    python bench/bench_compiled.py --device cuda   # the neural-ODE rows on the GPU (a lent H100/H200)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
if __name__ == "__main__":   # one thread for every peer, set before torch and JAX start (not when imported)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import fastode  # noqa: E402
from fastode.compiled.engine import CompiledOdeint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOL_SMALL, TOL_NEURAL = 1e-6, 1e-5
A20 = np.random.default_rng(0).standard_normal((20, 20)) / np.sqrt(20) - 0.5 * np.eye(20)
SPIRAL = np.array([[-0.1, 2.0], [-2.0, -0.1]])


# ------------------------------------------------------------------------------------------------ problems
def _rhs(name, xp, mat):
    """The right-hand side of problem ``name`` written once over an array namespace (torch, numpy, jax.numpy)."""
    if name == "van_der_pol":
        return lambda t, y: xp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])
    if name == "lotka_volterra":
        return lambda t, y: xp.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])
    if name == "kepler_orbit":
        def f(t, y):
            r3 = (y[0] ** 2 + y[1] ** 2) ** 1.5
            return xp.stack([y[2], y[3], -y[0] / r3, -y[1] / r3])
        return f
    if name == "linear_20":
        return lambda t, y: mat @ y
    if name == "cubic_spiral":
        return lambda t, y: (y ** 3) @ mat
    raise LookupError(name)


SMALL = {  # name: (y0, t1, matrix)
    "van_der_pol": ([2.0, 0.0], 10.0, None),
    "lotka_volterra": ([10.0, 5.0], 15.0, None),
    "kepler_orbit": ([0.5, 0.0, 0.0, 3 ** 0.5], 2 * np.pi, None),   # eccentricity 0.5, one period
    "linear_20": (list(np.linspace(1.0, -1.0, 20)), 10.0, A20),
    "cubic_spiral": ([2.0, 0.0], 25.0, SPIRAL),
}


class MLP(torch.nn.Module):
    def __init__(self, d, w):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(d, w), torch.nn.Tanh(), torch.nn.Linear(w, w), torch.nn.Tanh(),
                                       torch.nn.Linear(w, d))

    def forward(self, t, y):
        return self.net(y)


NEURAL = {"B16_w32": (16, 4, 32), "B256_w128": (256, 32, 128)}   # batch, dim, width


# ------------------------------------------------------------------------------------------------ peers
def small_peers(name, with_diffrax):
    y0l, t1, mat = SMALL[name]
    y0 = torch.tensor(y0l, dtype=torch.float64)
    t = torch.tensor([0.0, t1], dtype=torch.float64)
    f = _rhs(name, torch, None if mat is None else torch.tensor(mat))
    compiled = CompiledOdeint(f, rtol=TOL_SMALL, atol=TOL_SMALL)
    compiled(y0, t)   # build the program before timing
    peers = {
        "fastode_compiled": lambda: compiled(y0, t),
        "fastode": lambda: fastode.odeint(f, y0, t, rtol=TOL_SMALL, atol=TOL_SMALL),
    }
    import torchdiffeq
    peers["torchdiffeq"] = lambda: torchdiffeq.odeint(f, y0, t, rtol=TOL_SMALL, atol=TOL_SMALL)
    try:
        import torchode as to

        term = to.ODETerm(lambda tt, y: f(tt, y[0])[None])
        solver = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(atol=TOL_SMALL, rtol=TOL_SMALL,
                                                                                  term=term))
        ivp = to.InitialValueProblem(y0=y0[None], t_start=t[:1], t_end=t[1:])
        peers["torchode"] = lambda: solver.solve(ivp)
    except ImportError:
        pass
    from scipy.integrate import solve_ivp

    fn = _rhs(name, np, mat)
    y0n = np.array(y0l)
    peers["scipy_RK45"] = lambda: solve_ivp(fn, (0.0, t1), y0n, method="RK45", rtol=TOL_SMALL, atol=TOL_SMALL)
    peers["scipy_DOP853"] = lambda: solve_ivp(fn, (0.0, t1), y0n, method="DOP853", rtol=TOL_SMALL, atol=TOL_SMALL)
    if with_diffrax:
        peers["diffrax"] = diffrax_solve(name, y0l, t1, mat)
    return peers


def diffrax_solve(name, y0l, t1, mat):
    import diffrax
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    f = _rhs(name, jnp, None if mat is None else jnp.asarray(mat))
    term = diffrax.ODETerm(lambda t, y, args: f(t, y))

    @jax.jit
    def solve(y0):
        return diffrax.diffeqsolve(term, diffrax.Dopri5(), 0.0, t1, None, y0,
                                   stepsize_controller=diffrax.PIDController(rtol=TOL_SMALL, atol=TOL_SMALL),
                                   max_steps=100_000).ys

    y0 = jnp.asarray(y0l)
    solve(y0).block_until_ready()
    return lambda: solve(y0).block_until_ready()


def neural_peers(size, train, device="cpu"):
    B, d, w = NEURAL[size]
    func = MLP(d, w).to(device)
    y0 = torch.randn(B, d, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.tensor([0.0, 1.0], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    compiled = CompiledOdeint(func, rtol=TOL_NEURAL, atol=TOL_NEURAL)
    import torchdiffeq

    solvers = {
        "fastode_compiled": lambda: compiled(y0, t),
        "fastode": lambda: fastode.odeint(func, y0, t, rtol=TOL_NEURAL, atol=TOL_NEURAL),
        "torchdiffeq": lambda: torchdiffeq.odeint(func, y0, t, rtol=TOL_NEURAL, atol=TOL_NEURAL),
    }

    def run(solve):
        if not train:
            with torch.no_grad():
                out = solve()
        else:
            func.zero_grad()
            out = solve()[-1].pow(2).mean()
            out.backward()
        sync()
        return out

    run(solvers["fastode_compiled"])   # build the program(s)
    return {k: (lambda s=s: run(s)) for k, s in solvers.items()}


# ------------------------------------------------------------------------------------------------ compile times
_CHILD = """
import os, sys, time, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads(1)
import bench_compiled as b
t0 = time.perf_counter()
if {train}:
    b.neural_peers({size!r}, True)
else:
    b.small_peers({size!r}, False)
print("COMPILE_S", time.perf_counter() - t0)
"""


def compile_times(case, train):
    """Seconds to build the program(s) and run once: a cold process (empty cache dir) and a warm second one."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_NUM_THREADS="1")
        code = _CHILD.format(bench=str(Path(__file__).resolve().parent), train=train, size=case)
        for label in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILE_S")]
            out[label] = float(line[0].split()[1]) if line else float("nan")
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="device of the neural-ODE rows (cuda: the GPU tier; the small "
                    "ODEs stay on the CPU, where scipy and diffrax run)")
    args = ap.parse_args(argv)
    common.pin_threads(1)
    repeats = args.repeats or (5 if args.quick else 21)
    with_diffrax = importlib.util.find_spec("diffrax") is not None
    rows, raw = [], {}
    for name in SMALL:
        timing = common.time_alternating(small_peers(name, with_diffrax), repeats=repeats)
        raw[name] = {k: v.samples for k, v in timing.items()}
        rows.append(_row(name, "solve", timing))
        print(rows[-1], flush=True)
    for size in NEURAL:
        for train in (False, True):
            timing = common.time_alternating(neural_peers(size, train, args.device), repeats=max(3, repeats // 3))
            task = "train step" if train else "forward"
            raw[f"{size}/{task}"] = {k: v.samples for k, v in timing.items()}
            rows.append(_row(size, task, timing))
            print(rows[-1], flush=True)
    compiles = []
    if not args.quick:
        for case, train in (("van_der_pol", False), ("B16_w32", True)):
            ct = compile_times(case, train)
            compiles.append({"case": case + (" train step" if train else ""), **ct})
            print(compiles[-1], flush=True)
    extra = {}
    if with_diffrax:
        import diffrax
        import jax
        extra = {"jax": jax.__version__, "diffrax": diffrax.__version__}
    meta = common.metadata(repeats=repeats, **extra)
    name = "compiled" if args.device == "cpu" else f"compiled_{args.device}"
    common.write_json(RESULTS / f"{name}.json", {"meta": meta, "rows": rows, "compile_s": compiles, "raw": raw})
    common.write_text(RESULTS / f"{name}.md", _report(meta, rows, compiles))


def _row(case, task, timing):
    ms = {k: v.median * 1e3 for k, v in timing.items()}
    row = {"case": case, "task": task, **{k: round(v, 4) for k, v in ms.items()}}
    c = ms["fastode_compiled"]
    for peer in ("fastode", "torchdiffeq", "scipy_RK45", "diffrax"):
        if peer in ms:
            row[f"{peer}/compiled"] = round(ms[peer] / c, 3)
    return row


def _report(meta, rows, compiles):
    cols = ["case", "task", "fastode_compiled", "fastode", "torchdiffeq", "torchode", "scipy_RK45", "scipy_DOP853",
            "diffrax", "fastode/compiled", "torchdiffeq/compiled", "scipy_RK45/compiled", "diffrax/compiled"]
    text = ["# odeint(compile=True): the compiled engine against the eager loop and reference solvers", "",
            "Medians in milliseconds, warm (programs built before timing), one thread, peers interleaved. "
            "`x/compiled` columns: the peer's time over the compiled engine's (above 1: the compiled engine is "
            "faster). Small ODEs: float64, dopri5 rtol = atol = 1e-6, one output; neural ODEs: float32 MLP "
            "d-w-w-d tanh, dopri5 1e-5 on [0, 1]. Written by `bench/bench_compiled.py`.", "",
            common.markdown_table(rows, [c for c in cols if any(c in r for r in rows)]), ""]
    if compiles:
        text += ["## Compile times (seconds to the first result)", "",
                 common.markdown_table(compiles, ["case", "cold", "warm"]), "",
                 "cold: a fresh process with an empty inductor cache directory; warm: a second process on the same "
                 "directory (the on-disk FX graph and code caches)."]
    text += ["", common.metadata_markdown(meta), ""]
    return "\n".join(text)


if __name__ == "__main__":
    main()
