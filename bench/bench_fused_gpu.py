"""Per-step time of the fused Triton CNF solves against the FP32 roofline, torchdiffeq and torchode (CUDA only).

    python bench/bench_fused_gpu.py [--batches 10000 100000] [--repeats 5] [--out bench/results/fused_gpu_<gpu>.json]

The FFJORD toy CNF (concatsquash 2 -> 64 -> 64 -> 64 -> 2, tanh, Hutchinson), dopri5 at rtol = atol = 1e-5 over
T = 0.5, inference and one training iteration (forward + backward of the NLL), per accepted step:

* ``fused``: fastode's ``triton_adaptive`` engine (one launch per step attempt, the controller on the device; the
  training backward is the fused discrete adjoint, one launch per step);
* ``per-stage``: fastode's ``odeint`` engine with the Triton MLP kernel per stage (the path before the fused step);
* ``torchdiffeq`` / ``torchode``: the same CNF dynamics written the FFJORD way (``autograd.grad`` for the VJP);
* the FP32 SIMT floor: 211 kFLOP per sample per dopri5 step (``../shared/notes/gpu-anchors-roofline-triton-
  interpreter.md``, section 2) at 60 TFLOP/s; goals: within 2x of it at batch 10k, 30x faster per step than
  torchdiffeq at 10k and 3x at 100k.

Times are medians of ``--repeats`` runs after a warm-up (CUDA events around the whole solve, divided by its
accepted steps). Without CUDA it says so and exits 0: no GPU has been lent to this project yet, so this has not run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLOP_PER_SAMPLE_STEP = 211e3
FP32_SIMT = 60e12


def _cnf(engine):
    from fastode.flows import CNF
    from fastode.nn import ConcatSquashMLP

    torch.manual_seed(0)
    cnf = CNF(ConcatSquashMLP(2, (64, 64, 64), "tanh"), T=0.5, method="dopri5", rtol=1e-5, atol=1e-5,
              trace="hutchinson", eval_trace="hutchinson").cuda()
    cnf.engine = engine
    return cnf


def _peer(name):
    """torchdiffeq / torchode solving the same dynamics with an autograd VJP (FFJORD's divergence_approx)."""
    from fastode.nn import ConcatSquashMLP

    torch.manual_seed(0)
    net = ConcatSquashMLP(2, (64, 64, 64), "tanh", backend="torch").cuda()

    def rhs(t, state, e):
        z = state[0]
        with torch.enable_grad():
            z = z if z.requires_grad else z.requires_grad_(True)
            f = net(t, z)
            vjp = torch.autograd.grad(f, z, e, create_graph=True)[0]
        return f, -(vjp * e).sum(-1)

    def solve(x, e):
        t = torch.tensor([0.0, 0.5], device=x.device)
        if name == "torchdiffeq":
            import torchdiffeq

            sol = torchdiffeq.odeint(lambda t, s: rhs(t, s, e), (x, torch.zeros(x.shape[0], device=x.device)), t,
                                     rtol=1e-5, atol=1e-5, method="dopri5")
            return sol[0][-1], None
        import torchode as to

        def flat(t, y):
            B = y.shape[0]
            f, dl = rhs(t[0] if t.dim() else t, (y[:, :2],), e)
            return torch.cat([f, dl[:, None]], -1).reshape(B, 3)

        term = to.ODETerm(flat)
        step = to.Dopri5(term=term)
        ctrl = to.IntegralController(atol=1e-5, rtol=1e-5, term=term)
        solver = to.AutoDiffAdjoint(step, ctrl)
        y0 = torch.cat([x, torch.zeros(x.shape[0], 1, device=x.device)], -1)
        sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=t.expand(x.shape[0], 2)))
        return sol.ys[:, -1, :2], sol.stats
    return solve


def _time(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) * 1e3)  # us
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused_gpu.py: no CUDA device here; nothing measured (the fused solves' correctness is tested "
              "under TRITON_INTERPRET=1, see tests/test_flows_triton_engines.py)")
        return 0
    from common import RESULTS_DIR, markdown_table, metadata, write_json

    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 2, device="cuda")
        e = torch.randn(batch, 2, device="cuda")
        floor = FLOP_PER_SAMPLE_STEP * batch / FP32_SIMT * 1e6
        for engine in ("triton_adaptive", "odeint"):
            cnf = _cnf(engine)
            with torch.no_grad():
                cnf(x, noise=e)
            steps = cnf.last_solve.stats.num_accepted_steps
            with torch.no_grad():
                us = _time(lambda: cnf(x, noise=e), args.repeats)

            def train():
                cnf.zero_grad()
                o = cnf(x, noise=e)
                (o.out.pow(2).sum() - o.logdet.sum()).backward()
            us_train = _time(train, args.repeats)
            rows.append({"batch": batch, "solver": "fused" if engine == "triton_adaptive" else "per-stage",
                         "steps": steps, "us_per_step": us / steps, "train_us_per_step": us_train / steps,
                         "x_floor": us / steps / floor})
        for peer in ("torchdiffeq", "torchode"):
            try:
                solve = _peer(peer)
                out, stats = solve(x, e)
            except Exception as exc:  # noqa: BLE001 - a missing peer is reported, not fatal
                rows.append({"batch": batch, "solver": peer, "error": repr(exc)})
                continue
            us = _time(lambda: solve(x, e), args.repeats)
            # torchdiffeq takes fastode's steps (same controller); torchode controls each sample: its most steps
            n = int(stats["n_steps"].max()) if isinstance(stats, dict) and "n_steps" in stats else steps
            rows.append({"batch": batch, "solver": peer, "steps": n, "us_per_step": us / n, "x_floor": us / n / floor})
        fused = next(r for r in rows if r["batch"] == batch and r["solver"] == "fused")
        for r in rows:
            if r["batch"] == batch and "us_per_step" in r:
                r["x_fused"] = r["us_per_step"] / fused["us_per_step"]
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out = args.out or os.path.join(RESULTS_DIR, f"fused_gpu_{gpu}.json")
    meta = metadata(device=torch.cuda.get_device_name(), floor="211 kFLOP/sample/step at 60 TFLOP/s FP32 SIMT")
    write_json(out, {"meta": meta, "rows": rows})
    print(markdown_table(rows, ["batch", "solver", "steps", "us_per_step", "train_us_per_step", "x_floor", "x_fused"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
