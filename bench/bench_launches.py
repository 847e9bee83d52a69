"""Kernel launches and host reads per CNF solve: the per-stage Triton path against the fused Triton engines.

    python bench/bench_launches.py [--batch 64] [--out bench/results/launches.json]

Counts what the launchers and the solver loops report (:mod:`fastode.launch_count`): fastode's own kernel
launches (not the PyTorch operators between them) and host reads of device values (each one a host
synchronisation on a GPU). Counts do not depend on the device, so this runs under the Triton interpreter on a
CPU-only machine (``TRITON_INTERPRET=1`` is set when CUDA is absent); with CUDA it runs compiled and also records
the wall time per solve (median of 5).

Engines, on the FFJORD toy CNF (2 -> 32 -> 32 -> 2 here, tanh, Hutchinson trace, inference):
* ``odeint`` per stage: one MLP launch per stage; the stage combinations (torchdiffeq's arithmetic in the adaptive
  loop, the Triton RK stage kernel on a fixed grid) and the CNF's mixed error norm are PyTorch operators, not
  counted here; the error ratio is read on the host every attempt;
* ``triton_adaptive``: one fused launch per step attempt, the controller on the device (``sync_every=0``: one read
  at the end; ``sync_every=4``: a read every 4 launches);
* ``triton_adaptive`` per tile (16-row tiles): the whole solve in one launch;
* fixed grid rk4: ``odeint`` per stage against ``triton_grid``;
* training (forward + backward, ``gradient="direct"``): the per-stage path's autograd backward (one MLP backward
  launch per stage) against the fused discrete adjoint (one launch per step).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from fastode.flows import CNF  # noqa: E402
from fastode.flows.engines import get_engine  # noqa: E402
from fastode.nn import ConcatSquashMLP  # noqa: E402
from fastode.ops import registry  # noqa: E402
from fastode.ops import rk as rk_spec  # noqa: E402
from fastode.launch_count import counting  # noqa: E402
from fastode.solvers import fixed_grid, rk_adaptive  # noqa: E402


def _triton_rk_ops(like, norm, backend="auto"):
    """What ``resolve_rk_ops`` picks on CUDA, also under the interpreter: the Triton stage combination, the Triton
    error ratio where it implements the norm (RMS, max) and the reference ratio otherwise (the CNF's mixed norm)."""
    dev = like.device.type
    comb = registry.resolve("rk.combine", "triton", device_type=dev)
    try:
        ratio = registry.resolve("rk.error_ratio", "triton", device_type=dev, call=(norm,))
    except registry.BackendUnavailableError:
        ratio = registry.resolve("rk.error_ratio", registry.REFERENCE, device_type=dev, call=(norm,))
    return rk_spec.RKOps(comb.impl, rk_spec.combine_stages_exact, ratio.impl, comb.backend, comb.reason or ratio.reason)


def _cnf(method, dev, step_size=None, **kw):
    torch.manual_seed(0)
    dyn = ConcatSquashMLP(2, (32, 32), "tanh", backend="triton")
    return CNF(dyn, T=1.0, method=method, rtol=1e-7, atol=1e-7, step_size=step_size, trace="hutchinson",
               eval_trace="hutchinson", **kw).to(dev).eval()


def _run(cnf, x, e, train):
    if not train:
        with torch.no_grad():
            return cnf(x, noise=e)
    cnf.zero_grad()
    o = cnf(x, noise=e)
    (o.out.pow(2).sum() + o.logdet.sum()).backward()
    return o


def _measure(cnf, x, e, engine, sync_every=0, timed=False, train=False, label=None):
    eng = get_engine("triton_adaptive").backend
    old = eng.sync_every
    eng.sync_every = sync_every
    cnf.engine = engine
    cnf.train(train)
    try:
        _run(cnf, x, e, train)  # warm-up (compiles; the adaptive launcher learns the attempt count)
        with counting() as c:
            _run(cnf, x, e, train)
        times = []
        if timed:
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                _run(cnf, x, e, train)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
    finally:
        eng.sync_every = old
    st = cnf.last_solve.stats
    row = {"engine": label or cnf.last_solve.engine, "method": st.method,
           "work": "forward + backward" if train else "forward",
           "sync_every": sync_every if engine != "odeint" else "-",
           "nfe": st.num_fevals, "attempts": st.num_steps, "launches": c.total_launches,
           "launches_per_attempt": c.total_launches / max(1, st.num_steps), "host_reads": c.total_host_reads,
           "by_kernel": dict(c.launches), "reads": dict(c.host_reads)}
    if timed:
        row["ms_per_solve"] = 1e3 * statistics.median(times)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="bench/results/launches.json")
    args = ap.parse_args(argv)
    common.pin_threads(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    timed = dev == "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 2, generator=g).to(dev)
    e = torch.randn(args.batch, 2, generator=g).to(dev)
    # the per-stage path on the Triton RK ops (auto already picks them on CUDA)
    rk_adaptive.resolve_rk_ops = _triton_rk_ops
    fixed_grid.resolve_rk_ops = _triton_rk_ops
    rows = []
    cnf = _cnf("dopri5", dev)
    rows.append(_measure(cnf, x, e, "odeint", timed=timed))
    rows.append(_measure(cnf, x, e, "triton_adaptive", 0, timed))
    rows.append(_measure(cnf, x, e, "triton_adaptive", 4, timed))
    rows.append(_measure(cnf, x, e, "odeint", timed=timed, train=True))
    rows.append(_measure(cnf, x, e, "triton_adaptive", 0, timed, train=True))
    tiles = _cnf("dopri5", dev, step_control="per_tile", step_rows=16)
    rows.append(_measure(tiles, x, e, "triton_adaptive", timed=timed, label="triton_adaptive per tile (16 rows)"))
    cnf = _cnf("rk4", dev, step_size=0.25)
    rows.append(_measure(cnf, x, e, "odeint", timed=timed))
    rows.append(_measure(cnf, x, e, "triton_grid", timed=timed))
    rows.append(_measure(cnf, x, e, "odeint", timed=timed, train=True))
    rows.append(_measure(cnf, x, e, "triton_grid", timed=timed, train=True))
    meta = common.metadata(device=torch.cuda.get_device_name() if timed else "cpu (Triton interpreter: counts only)",
                           batch=args.batch, model="2-32-32-2 tanh, Hutchinson, T=1, rtol=atol=1e-7")
    common.write_json(args.out, {"meta": meta, "rows": rows})
    cols = {"engine": "engine", "method": "method", "work": "work", "sync_every": "sync_every", "nfe": "NFE",
            "attempts": "attempts",
            "launches": "launches", "launches_per_attempt": "launches / attempt", "host_reads": "host reads"}
    if timed:
        cols["ms_per_solve"] = "ms / solve"
    text = ["# Kernel launches and host reads per CNF solve", "",
            "`python bench/bench_launches.py` (fastode's own launches as its launchers count them, not the PyTorch "
            "operators between them; host reads of device values, each a host synchronisation on a GPU).", "",
            common.markdown_table(rows, cols), "", "Launches by kernel:", ""]
    for r in rows:
        text.append(f"- {r['engine']} {r['method']} {r['work']} (sync_every={r['sync_every']}): {r['by_kernel']}; "
                    f"reads {r['reads']}")
    text += ["", common.metadata_markdown(meta), ""]
    common.write_text(os.path.splitext(args.out)[0] + ".md", "\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
