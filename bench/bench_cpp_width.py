"""Where does the C++ concatsquash-MLP backend stop beating the PyTorch reference? (CPU, one thread)

One evaluation of ``concatsquash_mlp_hutchinson`` (the RNODE / FFJORD-with-Hutchinson right-hand side),
backend ``"cpp"`` (:mod:`fastode.cpp`) vs ``"torch"`` (:mod:`fastode.nn.functional`), float32, on a grid of

* hidden width ``w`` in 64, 128, 256, 300, 512 (``--layers`` hidden layers of width w, default 2: D-w-w-D),
* data dimension D in 2, 30,
* batch B in 256, 1024,
* activation tanh (AVX-512 micro-kernel path of the C++ core) and softplus (BLAS + element-wise path).

Two modes per configuration:

* ``train``: forward + backward. Loss = sum(f * gf) + sum(trace) + sum(kinetic) + sum(jac_frob) (all four
  outputs get gradients, as in RNODE training), gradients of every parameter and of z;
* ``nograd``: forward only under ``torch.no_grad()`` (inference / log-likelihood evaluation).

The two backends run on the same parameters and inputs; the largest relative difference of the outputs
(and of the gradients in ``train``) is recorded next to the times. Timing: ``common.time_alternating``
(peers interleaved, medians), one thread. Run it under the benchmark lock so that helpers do not overlap:

    flock /tmp/bench.lock python bench/bench_cpp_width.py            # -> bench/results/cpp_width.{json,md}
    python bench/bench_cpp_width.py --quick --out /tmp/cw            # smaller grid and repeat counts
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

import common  # noqa: E402
import fastode.cpp as fc  # noqa: E402
from fastode.nn import functional as ref  # noqa: E402

WIDTHS = (64, 128, 256, 300, 512)
DIMS = (2, 30)
BATCHES = (256, 1024)
ACTS = ("tanh", "softplus")


def make_params(dim: int, hidden, gen: torch.Generator):
    dims = [dim, *hidden, dim]
    params = []
    for n, m in zip(dims[:-1], dims[1:]):
        bound = 1.0 / n ** 0.5
        W = (torch.rand(m, n, generator=gen) * 2 - 1) * bound
        vecs = [(torch.rand(m, generator=gen) * 2 - 1) * bound for _ in range(4)]
        params.append([W, *vecs])
    return params


def _leaves(params):
    return [[p.clone().requires_grad_(True) for p in layer] for layer in params]


def _train_fn(impl, t, z, e, params, act, gf):
    """One forward + backward; returns (outputs, gradients) for the accuracy check."""
    leaves = _leaves(params)
    zz = z.clone().requires_grad_(True)
    flat = [p for layer in leaves for p in layer]

    def run():
        f, vjp, trace, kin, frob = impl.concatsquash_mlp_hutchinson(t, zz, e, leaves, act)
        loss = (f * gf).sum() + trace.sum() + kin.sum() + frob.sum()
        grads = torch.autograd.grad(loss, [zz, *flat])
        return (f, vjp, trace, kin, frob), grads

    return run


def _nograd_fn(impl, t, z, e, params, act):
    def run():
        with torch.no_grad():
            return impl.concatsquash_mlp_hutchinson(t, z, e, params, act), ()

    return run


def _relerr(a, b) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.detach(), y.detach()
        scale = float(y.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def measure(dim, width, batch, act, layers, repeats, budget_s):
    gen = torch.Generator().manual_seed(1000 * dim + width + batch)
    params = make_params(dim, (width,) * layers, gen)
    z = torch.randn(batch, dim, generator=gen)
    e = torch.randn(batch, dim, generator=gen)
    gf = torch.randn(batch, dim, generator=gen)
    t = torch.tensor(0.3)
    rows = []
    for mode in ("train", "nograd"):
        if mode == "train":
            fns = {"cpp": _train_fn(fc, t, z, e, params, act, gf), "torch": _train_fn(ref, t, z, e, params, act, gf)}
        else:
            fns = {"cpp": _nograd_fn(fc, t, z, e, params, act), "torch": _nograd_fn(ref, t, z, e, params, act)}
        (oc, gc), (orf, grf) = fns["cpp"](), fns["torch"]()
        if fc.resolve_backend("auto", z, *(p for layer in params for p in layer)) != "cpp":
            raise RuntimeError("the C++ backend cannot run these inputs; build it first")
        err = max(_relerr(oc, orf), _relerr(gc, grf) if gc else 0.0)
        tm = common.time_alternating(fns, repeats=repeats, warmup=1, budget_s=budget_s)
        rows.append({
            "mode": mode, "dim": dim, "width": width, "layers": layers, "batch": batch, "activation": act,
            "cpp_ms": tm["cpp"].median * 1e3, "torch_ms": tm["torch"].median * 1e3,
            "cpp_cpu_ms": tm["cpp"].cpu_median * 1e3, "torch_cpu_ms": tm["torch"].cpu_median * 1e3,
            "speedup_cpp": tm["torch"].median / tm["cpp"].median,
            "max_rel_diff": err,
            "timing": {k: v.as_dict() for k, v in tm.items()},
        })
        r = rows[-1]
        print(f"{mode:6s} D={dim:2d} w={width:3d} B={batch:4d} {act:8s} cpp {r['cpp_ms']:8.3f} ms  "
              f"torch {r['torch_ms']:8.3f} ms  x{r['speedup_cpp']:.2f}  diff {err:.1e}", flush=True)
    return rows


def to_markdown(res) -> str:
    meta = res["meta"]
    lines = [
        "# C++ vs PyTorch concatsquash MLP by width (CPU, one thread)",
        "",
        "Median time of one `concatsquash_mlp_hutchinson` evaluation, float32: `train` = forward + backward "
        "(gradients of all parameters and z through f, trace, kinetic and jac_frob), `nograd` = forward under "
        f"`torch.no_grad()`. {meta['layers']} hidden layers of width w (D-w-...-w-D). `speed-up` = torch / cpp "
        "(> 1: cpp faster). `max rel diff` = largest difference of outputs / gradients between the two, "
        "relative to the largest magnitude.",
        "",
    ]
    cols = {"dim": "D", "width": "w", "batch": "B", "activation": "act", "cpp_ms": "cpp ms", "torch_ms": "torch ms",
            "speedup_cpp": "speed-up", "max_rel_diff": "max rel diff"}
    for mode in ("train", "nograd"):
        lines += [f"## {mode}", "", common.markdown_table([r for r in res["rows"] if r["mode"] == mode], cols), ""]
    lines += [common.metadata_markdown(meta), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="widths 64/300, batch 256, fewer repeats")
    ap.add_argument("--layers", type=int, default=2, help="hidden layers (default 2)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    common.pin_threads(1)
    widths, batches = ((64, 300), (256,)) if args.quick else (WIDTHS, BATCHES)
    repeats = args.repeats or (5 if args.quick else 15)
    budget = 1.0 if args.quick else 2.5
    meta = common.metadata(layers=args.layers, gemm_backend=fc.ext().gemm_backend() if fc.available() else None)
    rows = []
    for act in ACTS:
        for dim in DIMS:
            for batch in batches:
                for width in widths:
                    rows += measure(dim, width, batch, act, args.layers, repeats, budget)
    meta["loadavg_end"] = common.loadavg()
    res = {"meta": meta, "rows": rows}
    md = to_markdown(res)
    if not args.no_write:
        out = Path(args.out)
        common.write_json(out / "cpp_width.json", res)
        common.write_text(out / "cpp_width.md", md)
        print(f"wrote {out / 'cpp_width.json'} and {out / 'cpp_width.md'}")
    else:
        print(md)


if __name__ == "__main__":
    main()
