"""fastode under torch.compile on the CPU: eager vs compiled per iteration, and the cold compile time.

Tasks (FFJORD's 2-D toy CNF, concatsquash 2 -> 64 -> 64 -> 64 -> 2 tanh, T = 0.5, float32, one thread):

* ``train``: a fixed-grid training step (rk4 h = 0.05, Hutchinson, fixed probe): the loss compiled
  (``torch.compile(loss_fn, fullgraph=True)``, inductor), backward and Adam eager;
* ``loglik``: an adaptive log-likelihood (dopri5 1e-5, exact trace, no gradient), compiled without ``fullgraph``
  (the step-size decision of each step attempt is a graph break).

Peers: ``eager`` (engine "auto": the fused C++ solve, cpp_grid / cpp_adaptive), ``eager per-stage``
(engine "odeint": what the compiled graph runs, one C++ network call per stage), ``compiled``. Cold compile: the
first compiled call's wall time minus a warm call's. Graph breaks from ``torch._dynamo.explain``.

    python bench/bench_compile.py            # -> bench/results/compile.{json,md}
    python bench/bench_compile.py --quick    # batch 64, few repeats, no files
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import common  # noqa: E402
from fastode.flows import CNF  # noqa: E402
from fastode.nn import ConcatSquashMLP  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _cnf(kind, engine):
    torch.manual_seed(0)
    mlp = ConcatSquashMLP(2, (64, 64, 64), "tanh")
    if kind == "train":
        return CNF(mlp, T=0.5, method="rk4", step_size=0.05, trace="hutchinson", engine=engine).train()
    return CNF(mlp, T=0.5, method="dopri5", rtol=1e-5, atol=1e-5, trace="hutchinson", eval_trace="exact",
               engine=engine).eval()


def tasks(kind, batch):
    g = torch.Generator().manual_seed(batch)
    x, e = torch.randn(batch, 2, generator=g), torch.randn(batch, 2, generator=g)
    fns, info = {}, {}
    for name, engine, compiled in (("eager", "auto", False), ("eager per-stage", "odeint", False),
                                   ("compiled", "auto", True)):
        cnf = _cnf(kind, engine)
        if kind == "train":
            opt = torch.optim.Adam(cnf.parameters(), lr=1e-4)

            def loss_fn(x, e, cnf=cnf):
                return -cnf.log_prob(x, noise=e).mean()
            loss = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn

            def step(loss=loss, opt=opt):
                value = loss(x, e)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
        else:
            def loglik(x, cnf=cnf):
                with torch.no_grad():
                    return cnf.log_prob(x)
            fn = torch.compile(loglik) if compiled else loglik

            def step(fn=fn):
                fn(x)
        if compiled:
            torch._dynamo.reset()
            t0 = time.perf_counter()
            step()
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            step()
            warm = time.perf_counter() - t0
            target = loss_fn if kind == "train" else loglik
            explanation = torch._dynamo.explain(target)(x, e) if kind == "train" else torch._dynamo.explain(target)(x)
            info[name] = {"compile_s": cold - warm, "graph_breaks": explanation.graph_break_count,
                          "graphs": explanation.graph_count}
        else:
            step()
            info[name] = {}
        info[name]["engine"] = cnf.last_solve.engine
        fns[name] = step
    return fns, info


def run(batches, repeats, budget):
    rows = []
    for kind in ("train", "loglik"):
        for batch in batches:
            fns, info = tasks(kind, batch)
            timing = common.time_alternating(fns, repeats=repeats, warmup=1, budget_s=budget)
            base = timing["eager"].median
            for name, tm in timing.items():
                r = {"task": kind, "batch": batch, "peer": name, "ms": 1e3 * tm.median,
                     "iqr_ms": [1e3 * q for q in tm.iqr], "x_eager": tm.median / base, **info[name]}
                rows.append(r)
                extra = (f"  compile {r['compile_s']:.1f} s, {r['graph_breaks']} breaks" if "compile_s" in r else "")
                print(f"{kind:6s} B={batch:5d} {name:16s} {r['engine']:12s} {r['ms']:9.2f} ms  x{r['x_eager']:.2f}"
                      f"{extra}", flush=True)
    return rows


def report(rows, meta) -> str:
    lines = ["# fastode under torch.compile (CPU)", "", __doc__.split("\n\n")[1], "", __doc__.split("\n\n")[2], "",
             "| task | batch | peer | engine | ms (median) | x eager | cold compile (s) | graph breaks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['batch']} | {r['peer']} | {r['engine']} | {common.fmt(r['ms'])} | "
                     f"{r['x_eager']:.2f} | {common.fmt(r['compile_s']) if 'compile_s' in r else ''} | "
                     f"{r.get('graph_breaks', '')} |")
    lines += ["", "x eager: the time over the eager fused engine's in the same run (< 1: faster).", "",
              common.metadata_markdown(meta)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.budget = [64], 3, 3.0
    common.pin_threads(1)
    rows = run(args.batches, args.repeats, args.budget)
    meta = common.metadata(torch_compile="inductor (default mode)")
    if not args.quick:
        common.write_json(RESULTS / "compile.json", {"meta": meta, "rows": rows})
        common.write_text(RESULTS / "compile.md", report(rows, meta))
        print(f"wrote {RESULTS / 'compile.md'}")


if __name__ == "__main__":
    main()
