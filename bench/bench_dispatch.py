"""Per-stage overhead of fastode's solver loop on the CPU: what a solve costs beyond its network calls.

Issue "One RK core, one dispatch" asked for the Python overhead per stage of the per-stage path (the path every
adaptive CNF solve takes on the CPU) to be measured before and after the redesign, and for nothing else to get
slower. Each task below is timed with the public API only, so the same script runs on both trees.

Model: FFJORD's toy CNF (concatsquash 2-64-64-64-2, tanh, T = 0.5), float32, one thread, seeded weights.

* ``loglik``: ``CNF.log_prob`` in eval mode, dopri5 at rtol = atol = 1e-5 and 1e-7, exact trace (the
  per-stage path: one C++ network call per stage, fastode's loop in Python), batch 128;
* ``net``: one ``ConcatSquashMLP.forward_with_trace(t, z, exact=True)`` under ``no_grad``, the same batch: the
  floor of one stage. ``overhead per stage = loglik / NFE - net``;
* ``train_fused``: a training iteration (rk4 h = 0.05, Hutchinson, backward, Adam) on the fused C++ grid path;
* ``train_per_stage``: the same with ``fused_cpu=False`` (odeint path with autograd);
* ``train_dopri5``: a training iteration with dopri5 1e-5 (adaptive, per-stage, autograd);
* ``odeint_linear``: ``fastode.odeint`` dopri5 rtol 1e-8 on a 10-D linear ODE, float64 (solver loop only).

    python bench/bench_dispatch.py --label before   # -> bench/results/dispatch_before.json
    python bench/bench_dispatch.py --label after    # -> dispatch_after.json, and dispatch.md comparing both
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

import common  # noqa: E402
import fastode  # noqa: E402
from fastode.flows import CNF  # noqa: E402
from fastode.nn import ConcatSquashMLP  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 128


def _data(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, generator=gen) * 1.5


def _cnf(method="dopri5", rtol=1e-5, atol=1e-5, step_size=None, fused_cpu=True, seed=0):
    torch.manual_seed(seed)
    mlp = ConcatSquashMLP(2, (64, 64, 64), "tanh")
    return CNF(mlp, T=0.5, method=method, rtol=rtol, atol=atol, step_size=step_size, fused_cpu=fused_cpu)


def tasks():
    x = _data(BATCH)
    out = {}
    for tol in (1e-5, 1e-7):
        cnf = _cnf(rtol=tol, atol=tol).eval()

        def ll(cnf=cnf):
            with torch.no_grad():
                cnf.reset_nfe()
                cnf.log_prob(x)
                return cnf.nfe
        out[f"loglik_{tol:g}"] = ll
    mlp = _cnf().dynamics
    t = torch.tensor(0.25)

    def net():
        with torch.no_grad():
            mlp.forward_with_trace(t, x, exact=True)
        return None
    out["net"] = net

    def train(cnf):
        opt = torch.optim.Adam(cnf.parameters(), lr=1e-4)
        e = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(1))

        def it():
            cnf.reset_nfe()
            opt.zero_grad()
            loss = -cnf.log_prob(x, noise=e).mean()
            loss.backward()
            opt.step()
            return cnf.nfe
        return it

    out["train_fused"] = train(_cnf(method="rk4", step_size=0.05).train())
    out["train_per_stage"] = train(_cnf(method="rk4", step_size=0.05, fused_cpu=False).train())
    out["train_dopri5"] = train(_cnf(rtol=1e-5, atol=1e-5).train())
    A = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.3
    y0 = torch.ones(10, dtype=torch.float64)
    tt = torch.tensor([0.0, 2.0], dtype=torch.float64)

    def lin():
        _, stats = fastode.odeint(lambda s, y: A @ y, y0, tt, rtol=1e-8, atol=1e-8, return_stats=True)
        return stats.num_fevals
    out["odeint_linear"] = lin
    return out


def measure(repeats: int, budget_s: float) -> dict:
    fns = tasks()
    nfe = {name: fn() for name, fn in fns.items()}  # warm-up, and the NFE of each task
    timing = common.time_alternating(fns, repeats=repeats, warmup=1, budget_s=budget_s)
    rows = {}
    for name, tm in timing.items():
        rows[name] = {"ms": 1e3 * tm.median, "iqr_ms": [1e3 * v for v in tm.iqr], "repeats": len(tm.samples),
                      "nfe": nfe[name]}
    net_us = 1e6 * timing["net"].median
    for name in list(rows):
        if name.startswith("loglik"):
            r = rows[name]
            r["us_per_stage"] = 1e3 * r["ms"] / r["nfe"]
            r["overhead_us_per_stage"] = r["us_per_stage"] - net_us
            r["network_share"] = net_us / r["us_per_stage"]
    return rows


def report(before: dict, after: dict) -> str:
    lines = ["# Per-stage dispatch overhead, before and after the RK core / dispatch redesign", "",
             __doc__.split("\n\n")[0], "",
             f"Before: commit {before['meta']['git_commit'][:7]}; after: commit {after['meta']['git_commit'][:7]}"
             f"{' (dirty tree)' if after['meta']['git_dirty'] else ''}. Medians of interleaved repeats (ms).", "",
             "| task | NFE | before ms | after ms | after / before | before overhead us/stage | "
             "after overhead us/stage | network share after |",
             "|---|---|---|---|---|---|---|---|"]
    for name, b in before["rows"].items():
        a = after["rows"].get(name)
        if a is None:
            continue
        ob = common.fmt(b.get("overhead_us_per_stage", "")) if "overhead_us_per_stage" in b else ""
        oa = common.fmt(a.get("overhead_us_per_stage", "")) if "overhead_us_per_stage" in a else ""
        share = f"{100 * a['network_share']:.0f}%" if "network_share" in a else ""
        lines.append(f"| {name} | {a['nfe']} | {common.fmt(b['ms'])} | {common.fmt(a['ms'])} | "
                     f"{a['ms'] / b['ms']:.2f} | {ob} | {oa} | {share} |")
    lines += ["", common.metadata_markdown(after["meta"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", choices=("before", "after"), required=True)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed repeats at most")
    args = ap.parse_args(argv)
    common.pin_threads(1)
    rows = measure(args.repeats, args.budget)
    meta = common.metadata(label=args.label)
    common.write_json(RESULTS / f"dispatch_{args.label}.json", {"meta": meta, "rows": rows})
    for name, r in rows.items():
        extra = f"  overhead {r['overhead_us_per_stage']:.0f} us/stage" if "overhead_us_per_stage" in r else ""
        print(f"{name:16s} {r['ms']:8.3f} ms  NFE {r['nfe']}{extra}")
    other = RESULTS / "dispatch_before.json"
    if args.label == "after" and other.exists():
        before = json.loads(other.read_text())
        common.write_text(RESULTS / "dispatch.md", report(before, {"meta": meta, "rows": rows}))
        print(f"wrote {RESULTS / 'dispatch.md'}")


if __name__ == "__main__":
    main()
