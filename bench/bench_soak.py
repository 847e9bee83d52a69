"""Soak test: resident memory over long CNF training runs, on each CNF engine and on ``odeint`` per gradient mode.

A training run whose memory keeps climbing dies after hours, so each configuration trains the README's density
model (FFJORD's 2-64-64-64-2 concatsquash CNF, tanh, learned end time, Hutchinson trace, batch 256, Adam, 8gaussians,
fixed seed) for ``--iters`` iterations in a fresh process (one thread), and records the resident set size (VmRSS)
and the C++ buffer pool's cached bytes every ``--every`` iterations. Reported: RSS after warm-up (the first
``--warmup`` iterations), at the end, and the growth between them. Not a CI test (minutes per configuration).

    python bench/bench_soak.py                      # every configuration, 3000 iterations each
    python bench/bench_soak.py --iters 500 --only cpp_grid_rk4
    python bench/bench_soak.py --replot             # rebuild soak.md / soak.png from soak.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name -> (build_flow / CNF keyword arguments, the engine the run must use)
CONFIGS = {
    "cpp_adaptive_dopri5_direct": (dict(method="dopri5", gradient="direct"), "cpp_adaptive"),
    "cpp_adaptive_dopri5_checkpoint": (dict(method="dopri5", gradient="checkpoint"), "cpp_adaptive"),
    "cpp_adaptive_dopri5_per_tile": (dict(method="dopri5", step_control="per_tile", step_rows=64), "cpp_adaptive"),
    "cpp_grid_rk4": (dict(method="rk4", step_size=0.05), "cpp_grid"),
    "odeint_dopri5_direct": (dict(method="dopri5", gradient="direct", fused_cpu=False), "odeint"),
    "odeint_dopri5_checkpoint": (dict(method="dopri5", gradient="checkpoint", fused_cpu=False), "odeint"),
    "odeint_dopri5_adjoint": (dict(method="dopri5", gradient="adjoint", fused_cpu=False), "odeint"),
    "odeint_rk4_direct": (dict(method="rk4", step_size=0.05, fused_cpu=False), "odeint"),
}


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def run_one(name: str, iters: int, every: int, batch: int, seed: int) -> dict:
    """Train configuration ``name`` in this process; the RSS curve and what ran."""
    import torch

    import fastode.cpp as fc
    from fastode.data import ToySampler
    from fastode.flows import build_flow, density_loss

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    kwargs, engine = CONFIGS[name]
    flow = build_flow(2, hidden=(64, 64, 64), activation="tanh", T=0.5, learn_T=True, trace="hutchinson",
                      rtol=1e-5, atol=1e-5, **kwargs)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3, weight_decay=1e-5)
    sample = ToySampler("8gaussians", seed=seed)
    curve, t_start = [], time.perf_counter()
    for it in range(1, iters + 1):
        loss, info = density_loss(flow, torch.as_tensor(sample(batch)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it == 1:
            ran = flow.blocks[0].last_solve.engine
            if ran != engine:
                raise RuntimeError(f"{name}: expected engine {engine!r}, ran {ran!r} "
                                   f"({flow.blocks[0].last_solve.describe()})")
        if it % every == 0 or it == iters:
            curve.append({"iteration": it, "rss_mib": round(_rss_mib(), 1),
                          "pool_mib": round(fc.cached_bytes() / 2**20, 1) if fc.available() else None,
                          "nfe": info["nfe"], "T": round(float(flow.blocks[0].T), 4),
                          "seconds": round(time.perf_counter() - t_start, 1)})
    return {"name": name, "engine": engine, "kwargs": kwargs, "curve": curve}


def summarise(res: dict, warmup: int) -> dict:
    curve = res["curve"]
    after = next((p for p in curve if p["iteration"] >= warmup), curve[0])
    end = curve[-1]
    return {"config": res["name"], "engine": res["engine"], "iterations": end["iteration"],
            f"RSS at {after['iteration']} (MiB)": after["rss_mib"], "RSS at end (MiB)": end["rss_mib"],
            "growth after warm-up (MiB)": round(end["rss_mib"] - after["rss_mib"], 1),
            "C++ pool at end (MiB)": end["pool_mib"], "s / 1000 it": round(1000 * end["seconds"] / end["iteration"], 1),
            "NFE (last)": end["nfe"], "T (last)": end["T"]}


def report(data: dict, out: Path) -> None:
    from common import markdown_table, metadata_markdown, write_text

    rows = [summarise(r, data["warmup"]) for r in data["runs"]]
    text = ["# Soak: resident memory over long CNF training runs (`bench/bench_soak.py`)", "",
            metadata_markdown(data["meta"]), "",
            f"The README's density model (2-64-64-64-2 concatsquash, tanh, learned T, Hutchinson, batch "
            f"{data['batch']}, Adam, 8gaussians, seed {data['seed']}), {data['iters']} iterations per configuration, "
            f"each in a fresh process, one thread. RSS = VmRSS; the pool is the C++ core's cache of saved-activation "
            f"buffers (`fastode.cpp.cached_bytes()`). Warm-up: the first {data['warmup']} iterations.", "",
            markdown_table(rows, list(rows[0])), ""]
    write_text(out / "soak.md", "\n".join(text))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in data["runs"]:
        xs = [p["iteration"] for p in r["curve"]]
        ax.plot(xs, [p["rss_mib"] for p in r["curve"]], label=r["name"])
    ax.set_xlabel("training iteration")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("CNF training: resident memory per engine / gradient mode")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # a child process's configuration
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.iters, args.every, args.batch, args.seed)))
        return
    from common import metadata, write_json

    if args.replot:
        report(json.loads((args.out / "soak.json").read_text()), args.out)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    meta = metadata()
    runs = []
    for name in args.only or list(CONFIGS):
        print(f"soak: {name} ({args.iters} iterations)", flush=True)
        cmd = [sys.executable, __file__, "--one", name, "--iters", str(args.iters), "--every", str(args.every),
               "--batch", str(args.batch), "--seed", str(args.seed)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print("  " + json.dumps(summarise(runs[-1], args.warmup)), flush=True)
    meta["loadavg_end"] = __import__("common").loadavg()
    data = {"meta": meta, "iters": args.iters, "warmup": args.warmup, "batch": args.batch, "seed": args.seed,
            "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "soak.json", data)
    report(data, args.out)


if __name__ == "__main__":
    main()
