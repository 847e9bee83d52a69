"""CNF *training* speed: fastode vs torchdiffeq on the same models, weights, batches, noise and solver.

Each configuration trains one CNF (a one-block FFJORD model built by :func:`fastode.demo.make_flow`) with
several peers:

* ``fastode``      -- the CNF's default path, discretise-optimise (``gradient="direct"``): on the CPU, fixed-grid
                      solves of a plain ConcatSquashMLP run as one fused C++ grid solve and one backward
                      (``fastode.cpp.CnfStepper``, :mod:`fastode.flows.engines`; column "path" = fused grid);
                      otherwise :func:`fastode.odeint` + the fused concatsquash kernels per RK stage (C++ on CPU,
                      Triton on CUDA); ``fused off``: the per-stage odeint path forced (``fused_cpu=False``);
                      ``nn=torch``: fastode's PyTorch reference MLP;
* ``torchdiffeq``  -- FFJORD's stack: torchdiffeq's solver over the same MLP in plain PyTorch, divergence by
                      autograd; ``odeint_adjoint`` (FFJORD, RNODE) or ``odeint`` (DOvsOD's Disc-Opt).

A *run* is ``--iters`` Adam iterations (forward, backward, step) from the same starting weights and
optimiser state, on the same batches and Hutchinson probes. Runs of the peers alternate (order rotated
every repeat, bench/common.time_alternating); the table reports the median over ``--repeats`` runs of
the time per iteration, the forward / backward NFE per iteration, and -- as a check that the peers
computed the same thing -- the largest difference of the training losses over a run between fastode and
torchdiffeq in the same gradient mode.

Configurations (FFJORD / RNODE / DOvsOD settings, scaled to a 2-core CPU):

* ``ffjord_toy``    8gaussians, 2-64-64-64-2 tanh, batch 100, T = 0.5 learned, dopri5 rtol = atol = 1e-5,
                    exact trace (FFJORD's train_toy.py defaults);
* ``discopt_toy``   the same model with rk4 (3/8 rule), h = 0.05: 10 steps (DOvsOD's 8gaussians setting);
* ``rnode_tabular`` breast-cancer (30-D), 30-300-300-30 softplus, batch 256, T = 1, rk4 h = 0.25 (4 steps,
                    RNODE's training solver), Hutchinson trace, kinetic + Jacobian-Frobenius weights 0.01.

    python bench/bench_cnf_training.py               # -> bench/results/cnf_training.{json,md}
    python bench/bench_cnf_training.py --quick       # fewer repeats, results not written
    python bench/bench_cnf_training.py --device cuda # on a GPU (files get a _cuda suffix)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from fastode.demo import build_parser as demo_parser  # noqa: E402
from fastode.demo import make_flow  # noqa: E402

CONFIGS = {
    "ffjord_toy": {
        "args": ["--data", "8gaussians", "--dims", "64-64-64", "--activation", "tanh", "--T", "0.5",
                 "--method", "dopri5", "--rtol", "1e-5", "--atol", "1e-5", "--trace", "exact"],
        "dim": 2, "batch": 100,
        "peers": [("fastode", "direct"), ("torchdiffeq", "adjoint"), ("torchdiffeq", "direct")],
        "baseline": ("torchdiffeq", "adjoint"),
        "describe": "8gaussians, 64-64-64 tanh, batch 100, dopri5 1e-5, exact trace, learned T",
    },
    "discopt_toy": {
        "args": ["--data", "8gaussians", "--dims", "64-64-64", "--activation", "tanh", "--T", "0.5",
                 "--method", "rk4", "--step-size", "0.05", "--trace", "exact"],
        "dim": 2, "batch": 100,
        "peers": [("fastode", "direct"), ("fastode", "direct", "auto", "fused off"), ("torchdiffeq", "direct")],
        "baseline": ("torchdiffeq", "direct"),
        "describe": "8gaussians, 64-64-64 tanh, batch 100, rk4 h=0.05 (10 steps), exact trace, learned T",
    },
    "rnode_tabular": {
        "args": ["--data", "8gaussians", "--dims", "300-300", "--activation", "softplus", "--T", "1.0",
                 "--method", "rk4", "--step-size", "0.25", "--trace", "hutchinson", "--kinetic", "0.01",
                 "--jacobian-frobenius", "0.01"],
        "dim": 30, "batch": 256,
        "peers": [("fastode", "direct"), ("fastode", "direct", "auto", "fused off"), ("fastode", "direct", "torch"),
                  ("torchdiffeq", "adjoint"), ("torchdiffeq", "direct")],
        "baseline": ("torchdiffeq", "adjoint"),
        "describe": "breast-cancer 30-D, 300-300 softplus, batch 256, rk4 h=0.25 (4 steps), Hutchinson, "
                    "kinetic + JF 0.01",
    },
}


def _batches(cfg, n_iters, seed, dtype, device):
    """The batches of one run (identical for every peer and repeat)."""
    from fastode.data import ToySampler, load_breast_cancer
    from fastode.train import _mix_seed

    if cfg["dim"] == 2:
        data = demo_parser().parse_args(cfg["args"]).data
        xs = [ToySampler(data, _mix_seed(seed, 0, i))(cfg["batch"]) for i in range(n_iters)]
    else:
        trn = load_breast_cancer().trn
        rng = np.random.RandomState(seed)
        xs = [trn[rng.choice(len(trn), cfg["batch"], replace=False)] for _ in range(n_iters)]
    return [torch.as_tensor(x, dtype=dtype, device=device) for x in xs]


class Peer:
    """One library / gradient mode; ``run()`` trains ``len(batches)`` iterations from the common start."""

    def __init__(self, name, library, gradient, nn_backend, args, cfg, start_state, batches, seed, device,
                 fused=True):
        self.name, self.batches, self.seed, self.device = name, batches, seed, device
        self.flow = make_flow(args, cfg["dim"], library, gradient, nn_backend).to(device=device,
                                                                                 dtype=batches[0].dtype)
        self.flow.set_fused_cpu(fused)
        self.path = None
        self.start = start_state
        self.lr, self.wd = args.lr, args.weight_decay
        self.nfe_f, self.nfe_b, self.losses = [], [], []

    def run(self):
        from fastode.flows import density_loss

        self.flow.load_state_dict(self.start)
        opt = torch.optim.Adam(self.flow.parameters(), lr=self.lr, weight_decay=self.wd)
        nfe_f, nfe_b, losses = [], [], []
        for i, x in enumerate(self.batches):
            gen = torch.Generator(device=self.device).manual_seed(1000 * self.seed + i)
            self.flow.reset_nfe()
            opt.zero_grad(set_to_none=True)
            loss, _ = density_loss(self.flow, x, noise=gen)
            f = self.flow.nfe
            loss.backward()
            opt.step()
            nfe_f.append(f)
            nfe_b.append(self.flow.nfe - f)
            losses.append(float(loss.detach()))
        self.path = self.flow.last_solves()[0].engine
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.nfe_f, self.nfe_b, self.losses = nfe_f, nfe_b, losses


def bench_config(key, cfg, opts, device, dtype):
    args = demo_parser().parse_args(cfg["args"])
    batches = _batches(cfg, opts.iters, opts.seed, dtype, device)
    torch.manual_seed(opts.seed)
    start = copy.deepcopy(make_flow(args, cfg["dim"], "fastode", "direct").to(device=device, dtype=dtype).state_dict())
    peers = {}
    for library, gradient, *nn in cfg["peers"]:
        nn_name = nn[0] if nn else "auto"
        fused = "fused off" not in nn[1:]
        name = (f"{library} ({gradient}" + (f", nn={nn_name}" if nn_name != "auto" else "")
                + ("" if fused else ", fused off") + ")")
        peers[name] = Peer(name, library, gradient, nn_name, args, cfg, start, batches, opts.seed, device,
                           fused=fused)
    timings = common.time_alternating({n: p.run for n, p in peers.items()}, repeats=opts.repeats, warmup=1,
                                      budget_s=opts.budget)
    base_name = f"{cfg['baseline'][0]} ({cfg['baseline'][1]})"
    rows = []
    for (library, gradient, *_nn), (name, p) in zip(cfg["peers"], peers.items()):
        med = timings[name].median / opts.iters
        other = f"{'torchdiffeq' if library == 'fastode' else 'fastode'} ({gradient})"
        same_mode = (float(np.max(np.abs(np.array(p.losses) - np.array(peers[other].losses))))
                     if other in peers else None)
        rows.append({
            "config": key, "peer": name,
            "ms_per_iter": 1e3 * med,
            "ms_per_iter_iqr": [1e3 * v / opts.iters for v in timings[name].iqr],
            "nfe_forward": float(np.mean(p.nfe_f)), "nfe_backward": float(np.mean(p.nfe_b)),
            "speedup_vs_baseline": timings[base_name].median / timings[name].median,
            # same computation check: the other library with the same gradient mode (the adjoint's gradient
            # differs from discretise-optimise's, so runs with different modes drift apart)
            "max_loss_diff_same_mode": same_mode,
            "repeats": len(timings[name].samples),
            "nn_backend": getattr(p.flow.blocks[0].last_solve, "mlp_backend", None) or "plain PyTorch (autograd)",
            "path": ("torchdiffeq" if library == "torchdiffeq" else
                     "fused grid" if p.path == "cpp_grid" else "odeint per stage"),
            "final_loss": p.losses[-1],
        })
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--iters", type=int, default=10, help="training iterations per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per peer (medians)")
    ap.add_argument("--budget", type=float, default=None, help="stop repeating a config after this many seconds "
                    "(at least 3 repeats)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 iterations x 3 repeats, nothing written")
    ap.add_argument("--out", default=str(common.RESULTS_DIR))
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.iters, opts.repeats = 3, 3
    common.pin_threads(opts.threads)
    device = torch.device(opts.device)
    dtype = torch.float64 if opts.dtype == "float64" else torch.float32
    _fn, why = common.fastode_odeint()
    if why:
        print(f"bench_cnf_training: {why}")
        return 1
    meta = common.metadata(device=str(device), dtype=opts.dtype, iters_per_run=opts.iters, repeats=opts.repeats)
    rows = []
    t0 = time.perf_counter()
    for key in [k.strip() for k in opts.configs.split(",") if k.strip()]:
        if key not in CONFIGS:
            raise SystemExit(f"unknown config {key!r}; choose from {', '.join(CONFIGS)}")
        print(f"[{key}] {CONFIGS[key]['describe']}", flush=True)
        for r in bench_config(key, CONFIGS[key], opts, device, dtype):
            rows.append(r)
            print(f"  {r['peer']:<30} {r['path']:<16} {r['ms_per_iter']:9.2f} ms/iter  NFE {r['nfe_forward']:5.1f} + "
                  f"{r['nfe_backward']:5.1f}  speed-up {r['speedup_vs_baseline']:5.2f}x  "
                  + (f"max loss diff vs other library {r['max_loss_diff_same_mode']:.1e}"
                     if r["max_loss_diff_same_mode"] is not None else ""), flush=True)
    meta["loadavg_end"] = common.loadavg()
    meta["elapsed_s"] = time.perf_counter() - t0
    if opts.quick:
        return 0
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    out = Path(opts.out)
    common.write_json(out / f"cnf_training{suffix}.json",
                      {"meta": meta, "configs": {k: CONFIGS[k]["describe"] for k in CONFIGS}, "rows": rows})
    table = common.markdown_table(rows, {
        "config": "config", "peer": "peer", "ms_per_iter": "ms / iteration (median)",
        "nn_backend": "MLP backend", "path": "path", "nfe_forward": "NFE fwd", "nfe_backward": "NFE bwd", "speedup_vs_baseline": "speed-up vs FFJORD stack",
        "max_loss_diff_same_mode": "max loss diff, other library same mode"})
    text = ["# CNF training: fastode vs torchdiffeq", "",
            f"Median time per training iteration (forward + backward + Adam) over {opts.repeats} alternating runs "
            f"of {opts.iters} iterations from the same weights, batches and noise; {opts.dtype}, device {device}.",
            "", *(f"- `{k}`: {CONFIGS[k]['describe']}" for k in CONFIGS), "", table, "",
            common.metadata_markdown(meta), ""]
    common.write_text(out / f"cnf_training{suffix}.md", "\n".join(text))
    print(f"wrote {out / f'cnf_training{suffix}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
