"""Per-stage overhead of fastode's solver loop on the CPU: what a solve costs beyond its network calls.

Issue "One RK core, one dispatch" asked for the Python overhead per stage of the per-stage path (the path every
adaptive CNF solve takes on the CPU) to be measured before and after the redesign, and for nothing else to get
slower. Each task below is timed with the public API only, so the same script runs on both trees.

Model: FFJORD's toy CNF (concatsquash 2-64-64-64-2, tanh, T = 0.5), float32, one thread, seeded weights.

* ``loglik``: ``CNF.log_prob`` in eval mode, dopri5 at rtol = atol = 1e-5 and 1e-7, exact trace (the
  per-stage path: one C++ network call per stage, fastode's loop in Python), batch 128;
* ``net``: ``ConcatSquashMLP.forward_with_trace(t, z, exact=True)`` under ``no_grad``, the same batch (the
  module's public call, with its input checks and backend choice), per call over blocks of ``BLOCK`` calls;
* ``kernel``: the C++ kernel of that call alone (``fastode.cpp.ext().mlp_probe_forward``): the floor of one
  stage. ``overhead per stage = loglik / NFE - kernel`` (the solver loop, the CNF's augmented state and the
  dispatch around the network);
* ``train_fused``: a training iteration (rk4 h = 0.05, Hutchinson, backward, Adam) on the fused C++ grid path;
* ``train_per_stage``: the same with ``fused_cpu=False`` (odeint path with autograd);
* ``train_dopri5``: a training iteration with dopri5 1e-5 (adaptive, per-stage, autograd);
* ``odeint_linear``: ``fastode.odeint`` dopri5 rtol 1e-8 on a 10-D linear ODE, float64 (solver loop only);
* ``loglik_per_tile``: ``CNF.log_prob`` with per-tile step control (tiles of 16 rows), dopri5 1e-5;
* ``train_dopri5_checkpoint``: ``train_dopri5`` with ``gradient="checkpoint"`` (the fused adaptive engine's
  checkpointed discrete adjoint, its backward counted).

``--name`` / ``--title`` name the result files and the report, so that each redesign keeps its own comparison
(``dispatch``: the RK core / dispatch redesign; ``redesign_top``: the top-layer redesign of issue 26).

    git worktree add /tmp/base 2363de4 && cp fastode/_C*.so /tmp/base/fastode/   # csrc/ unchanged since
    python bench/bench_dispatch.py --against /tmp/base
    # -> bench/results/dispatch_before.json, dispatch_after.json and dispatch.md: worker processes on the two
    #    trees alternate for --rounds rounds (so machine drift hits both alike); medians over all rounds
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

import common  # noqa: E402
import fastode  # noqa: E402
import fastode.cpp  # noqa: E402
from fastode.flows import CNF  # noqa: E402
from fastode.nn import ConcatSquashMLP  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 128
BLOCK = 20
"""``net`` and ``kernel`` time blocks of this many consecutive calls (reported per call): interleaved with the
solves one call at a time, a single call is timed with whatever cache state the previous task left, which favours
a tree whose solves run the same Python path as ``net`` (the baseline's per-stage autograd Function) over one whose
solves skip it (the bound no-grad path)."""


def _data(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, generator=gen) * 1.5


def _cnf(method="dopri5", rtol=1e-5, atol=1e-5, step_size=None, fused_cpu=True, seed=0, **kw):
    torch.manual_seed(seed)
    mlp = ConcatSquashMLP(2, (64, 64, 64), "tanh")
    return CNF(mlp, T=0.5, method=method, rtol=rtol, atol=atol, step_size=step_size, fused_cpu=fused_cpu, **kw)


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
    tiled = _cnf(step_control="per_tile", step_rows=16).eval()

    def ll_tiles():
        with torch.no_grad():
            tiled.reset_nfe()
            tiled.log_prob(x)
            return tiled.nfe
    out["loglik_per_tile"] = ll_tiles
    mlp = _cnf().dynamics
    t = torch.tensor(0.25)

    def net():
        with torch.no_grad():
            for _ in range(BLOCK):
                mlp.forward_with_trace(t, x, exact=True)
        return None
    out["net"] = net
    flat = [p.detach() for layer in mlp.params() for p in layer]
    ext = fastode.cpp.ext()

    def kernel():
        for _ in range(BLOCK):
            ext.mlp_probe_forward(0.25, x, None, flat, 0, False, False, 64)  # activation 0 = tanh, tile 64
        return None
    out["kernel"] = kernel

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
    out["train_dopri5_checkpoint"] = train(_cnf(rtol=1e-5, atol=1e-5, gradient="checkpoint").train())
    A = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.3
    y0 = torch.ones(10, dtype=torch.float64)
    tt = torch.tensor([0.0, 2.0], dtype=torch.float64)

    def lin():
        _, stats = fastode.odeint(lambda s, y: A @ y, y0, tt, rtol=1e-8, atol=1e-8, return_stats=True)
        return stats.num_fevals
    out["odeint_linear"] = lin
    return out


def sample(repeats: int, budget_s: float) -> dict:
    """``{task: {"samples": [s, ...], "nfe": n}}`` for this process's fastode."""
    fns = tasks()
    nfe = {name: fn() for name, fn in fns.items()}  # warm-up, and the NFE of each task
    timing = common.time_alternating(fns, repeats=repeats, warmup=1, budget_s=budget_s)
    return {name: {"samples": tm.samples, "nfe": nfe[name]} for name, tm in timing.items()}


def rows_from(samples: dict) -> dict:
    rows = {}
    for name, v in samples.items():
        per = BLOCK if name in ("net", "kernel") else 1
        tm = common.Timing(samples=[x / per for x in v["samples"]])
        rows[name] = {"ms": 1e3 * tm.median, "iqr_ms": [1e3 * q for q in tm.iqr], "repeats": len(tm.samples),
                      "nfe": v["nfe"]}
    kernel_us = 1e3 * rows["kernel"]["ms"]
    for name in list(rows):
        if name.startswith("loglik"):
            r = rows[name]
            r["us_per_stage"] = 1e3 * r["ms"] / r["nfe"]
            r["overhead_us_per_stage"] = r["us_per_stage"] - kernel_us
            r["kernel_share"] = kernel_us / r["us_per_stage"]
    return rows


def report(before: dict, after: dict, title: str) -> str:
    lines = [f"# {title}", "",
             __doc__.split("\n\n")[0], "",
             f"Before: commit {before['meta']['git_commit'][:7]}; after: commit {after['meta']['git_commit'][:7]}"
             f"{' (dirty tree)' if after['meta']['git_dirty'] else ''}. Medians over {after['meta'].get('rounds', 1)} "
             "alternating rounds of worker processes on each tree (ms).", "",
             "| task | NFE | before ms | after ms | after / before | before quartiles ms | after quartiles ms | "
             "before overhead us/stage | after overhead us/stage | kernel share after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, b in before["rows"].items():
        a = after["rows"].get(name)
        if a is None:
            continue
        ob = common.fmt(b.get("overhead_us_per_stage", "")) if "overhead_us_per_stage" in b else ""
        oa = common.fmt(a.get("overhead_us_per_stage", "")) if "overhead_us_per_stage" in a else ""
        share = f"{100 * a['kernel_share']:.0f}%" if "kernel_share" in a else ""
        iqr = [" - ".join(common.fmt(q) for q in r["iqr_ms"]) for r in (b, a)]
        lines.append(f"| {name} | {a['nfe']} | {common.fmt(b['ms'])} | {common.fmt(a['ms'])} | "
                     f"{a['ms'] / b['ms']:.2f} | {iqr[0]} | {iqr[1]} | {ob} | {oa} | {share} |")
    lines += ["", common.metadata_markdown(after["meta"])]
    return "\n".join(lines) + "\n"


def _print(label, rows):
    for name, r in rows.items():
        extra = f"  overhead {r['overhead_us_per_stage']:.0f} us/stage" if "overhead_us_per_stage" in r else ""
        print(f"{label:6s} {name:16s} {r['ms']:8.3f} ms  NFE {r['nfe']}{extra}")


def _tree_commit(tree: Path) -> tuple:
    def git(*a):
        return subprocess.run(["git", "-C", str(tree), *a], capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))


def compare(against: Path, rounds: int, repeats: int, budget_s: float, name: str, title: str) -> None:
    """Alternate worker processes on the baseline tree ``against`` and on this tree, ``rounds`` times, so that
    machine drift hits both alike; medians over every round's samples."""
    trees = {"before": against.resolve(), "after": Path(__file__).resolve().parents[1]}
    pooled = {label: {} for label in trees}
    for r in range(rounds):
        for label in (("before", "after") if r % 2 == 0 else ("after", "before")):
            env = dict(os.environ, PYTHONPATH=str(trees[label]))
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run([sys.executable, __file__, "--worker", f.name, "--repeats", str(repeats),
                                "--budget", str(budget_s)], env=env, check=True, cwd=trees[label])
                got = json.loads(Path(f.name).read_text())
            for task, v in got.items():
                slot = pooled[label].setdefault(task, {"samples": [], "nfe": v["nfe"]})
                slot["samples"] += v["samples"]
        print(f"round {r + 1}/{rounds} done", flush=True)
    docs = {}
    commits = {label: _tree_commit(tree) for label, tree in trees.items()}  # before writing any result file
    for label, tree in trees.items():
        rows = rows_from(pooled[label])
        commit, dirty = commits[label]
        meta = common.metadata(label=label, rounds=rounds)
        meta.update(git_commit=commit, git_dirty=dirty)
        docs[label] = {"meta": meta, "rows": rows}
        common.write_json(RESULTS / f"{name}_{label}.json", docs[label])
        _print(label, rows)
    common.write_text(RESULTS / f"{name}.md", report(docs["before"], docs["after"], title))
    print(f"wrote {RESULTS / f'{name}.md'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", type=Path, help="a checkout of the baseline commit (built in place)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats per task per round")
    ap.add_argument("--budget", type=float, default=15.0, help="seconds of timed repeats per round at most")
    ap.add_argument("--name", default="dispatch", help="result files: bench/results/NAME.md, NAME_before/after.json")
    ap.add_argument("--title", default="Per-stage dispatch overhead, before and after the RK core / dispatch redesign")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    common.pin_threads(1)
    if args.worker:
        common.write_json(Path(args.worker), sample(args.repeats, args.budget))
        return
    if args.against is None:
        ap.error("pass --against DIR, a checkout of the baseline commit with fastode/_C built")
    compare(args.against, args.rounds, args.repeats, args.budget, args.name, args.title)


if __name__ == "__main__":
    main()
