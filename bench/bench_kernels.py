"""Per-evaluation time of the fused Triton kernels vs their PyTorch alternatives (CUDA only).

    python bench/bench_kernels.py [--batches 1000 10000 100000] [--repeats 7] [--out bench/results/...json]

Compares, for the FFJORD toy CNF dynamics (concatsquash 2 -> 64 -> 64 -> 64 -> 2, tanh) and one
wider model (16 -> 256 -> 256 -> 16, softplus), per evaluation of ``f`` plus the Hutchinson terms
(vjp, trace, |f|^2, |vjp|^2):

* ``fused``      -- fastode's Triton kernel (backend "triton"; one launch forward, one backward);
* ``unfused``    -- the PyTorch reference ``fastode.nn.functional`` (closed-form VJP, ~50 small kernels);
* ``autograd``   -- torchdiffeq/FFJORD style: ``f = net(t, z)`` then ``torch.autograd.grad(f, z, e,
  create_graph=True)`` (what FFJORD's ``divergence_approx`` does);

each for inference (no grad) and for training (forward + backward to the parameters through the trace
and the RNODE terms). All three use exact FP32 matmuls (``allow_tf32=False``; the kernel uses
``input_precision="ieee"``). Also times the fused RK step epilogue (solution + error estimate + error-ratio
RMS/max over the batch and per sample, one launch) against the torch ops it replaces.

Without CUDA it prints why and exits 0: no GPU was available when this script was written, so it has
not been run yet; results go to ``bench/results/bench_kernels_<gpu>.json`` when it is.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, markdown_table, metadata, time_alternating, write_json  # noqa: E402


DEV = "cuda"


def _cuda_timed(fn, iters):
    def run():
        for _ in range(iters):
            fn()
        if DEV == "cuda":
            torch.cuda.synchronize()
    return run


def bench_mlp(D, hidden, act, batch, repeats, iters):
    from fastode.nn import ConcatSquashMLP
    from fastode.nn import functional as F
    from fastode.triton import _mlp as TB

    torch.manual_seed(0)
    m = ConcatSquashMLP(D, hidden, act, backend="torch").to(DEV)
    params = m.params()
    flat = list(m.parameters())
    z = torch.randn(batch, D, device=DEV)
    e = torch.randn_like(z)
    t = torch.tensor(0.5, device=DEV)

    def autograd_hutch(t, z, e):
        zz = z.requires_grad_(True) if not z.requires_grad else z
        with torch.enable_grad():
            f = m(t, zz)
            vjp = torch.autograd.grad(f, zz, e, create_graph=True)[0]
        tr = (vjp * e).sum(-1)
        return f, vjp, tr, (f * f).sum(-1), (vjp * vjp).sum(-1)

    impls = {
        "fused": lambda t, z, e: TB.concatsquash_mlp_hutchinson(t, z, e, params, act),
        "unfused": lambda t, z, e: F.concatsquash_mlp_hutchinson(t, z, e, params, act),
        "autograd": autograd_hutch,
    }

    def infer(fn):
        def go():
            with torch.no_grad() if fn is not autograd_hutch else torch.enable_grad():
                fn(t, z.detach(), e)
        return go

    def train(fn):
        def go():
            zz = z.detach().requires_grad_(True)
            f, vjp, tr, kin, fr = fn(t, zz, e)
            loss = (f * f).mean() + tr.mean() + 0.01 * kin.mean() + 0.01 * fr.mean()
            torch.autograd.grad(loss, flat)
        return go

    rows = []
    for mode, wrap in (("inference", infer), ("training", train)):
        fns = {name: _cuda_timed(wrap(fn), iters) for name, fn in impls.items()}
        res = time_alternating(fns, repeats, warmup=2)
        base = res["autograd"].median
        for name in impls:
            rows.append(dict(model=f"{D}-{'-'.join(map(str, hidden))}-{D} {act}", batch=batch, mode=mode,
                             impl=name, ms_per_eval=1e3 * res[name].median / iters,
                             speedup_vs_autograd=base / res[name].median))
    return rows


def bench_epilogue(n_rows, n_cols, repeats, iters):
    from fastode.triton._rk import rk_epilogue

    try:
        from fastode.tableaus import get_tableau

        tab = get_tableau("dopri5")
        b, be = list(tab.b), list(tab.b_err)
    except Exception:  # fall back to torchdiffeq's tableau
        from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU as T

        b, be = T.c_sol.tolist(), T.c_error.tolist()
    y0 = torch.randn(n_rows, n_cols, device=DEV)
    ks = [torch.randn_like(y0) for _ in b]
    dt = torch.tensor(0.01, device=DEV)

    def torch_epi():
        y1 = y0 + sum(k * (c * dt) for c, k in zip(b, ks) if c != 0)
        err = sum(k * (c * dt) for c, k in zip(be, ks) if c != 0)
        r = err / (1e-6 + 1e-3 * torch.max(y0.abs(), y1.abs()))
        return r.pow(2).mean().sqrt(), r.abs().max(), r.pow(2).mean(1).sqrt(), r.abs().amax(1)

    fns = {"fused": _cuda_timed(lambda: rk_epilogue(y0, ks, b, be, dt, 1e-6, 1e-3), iters),
           "torch": _cuda_timed(torch_epi, iters)}
    res = time_alternating(fns, repeats, warmup=2)
    return [dict(model=f"dopri5 epilogue {n_rows}x{n_cols}", batch=n_rows, mode="inference", impl=k,
                 ms_per_eval=1e3 * v.median / iters, speedup_vs_autograd=res["torch"].median / v.median)
            for k, v in res.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20, help="evaluations per timed sample")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="exercise the script on the CPU under TRITON_INTERPRET=1 (tiny sizes, timings meaningless)")
    args = ap.parse_args(argv)
    if args.smoke:
        global DEV
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("bench_kernels --smoke needs TRITON_INTERPRET=1")
            return 1
        DEV = "cpu"
        rows = bench_mlp(2, (16,), "tanh", 40, 1, 1) + bench_epilogue(40, 3, 1, 1)
        print(markdown_table(rows, ["model", "batch", "mode", "impl", "ms_per_eval", "speedup_vs_autograd"]))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernels: TRITON_INTERPRET is set; unset it to time compiled kernels")
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels: skipped, no CUDA device (this benchmark times GPU kernels; run it on a GPU)")
        return 0
    try:
        import triton  # noqa: F401
    except Exception as exc:
        print(f"bench_kernels: skipped, triton not importable ({exc})")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    t0 = time.time()
    for batch in args.batches:
        rows += bench_mlp(2, (64, 64, 64), "tanh", batch, args.repeats, args.iters)
        rows += bench_mlp(16, (256, 256), "softplus", batch, args.repeats, args.iters)
        rows += bench_epilogue(batch, 2, args.repeats, args.iters)
    rows += bench_epilogue(1000, 1000, args.repeats, args.iters)
    gpu = torch.cuda.get_device_name()
    table = markdown_table(rows, ["model", "batch", "mode", "impl", "ms_per_eval", "speedup_vs_autograd"])
    print(f"GPU: {gpu}   (speedup column: vs autograd for MLPs, vs torch ops for the epilogue)")
    print(table)
    out = args.out or os.path.join(RESULTS_DIR, f"bench_kernels_{gpu.replace(' ', '_')}.json")
    write_json(out, {"meta": metadata(gpu=gpu, tf32=False, elapsed_s=time.time() - t0), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
