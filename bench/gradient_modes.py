"""Gradient modes: time and peak memory of forward + backward through a batched neural ODE.

Model: y' = MLP([y, t]), tanh, (dim + 1) -> hidden -> hidden -> dim, float32, batch B, t in [0, 1],
loss = mean(y(1)^2); gradients w.r.t. all MLP parameters and y0.  Configurations: fixed-step ``rk4``
(torchdiffeq's 3/8 rule) with N steps (``options={"step_size": 1/N}``) and adaptive ``dopri5``.

Peers:

    fastode   gradient="direct" (backprop through the solve), "checkpoint" (discrete adjoint, one
              stored state per step), "adjoint" (continuous adjoint, torchdiffeq semantics)
    torchdiffeq  odeint (backprop) and odeint_adjoint
    torchode  AutoDiffAdjoint (backprop) and BacksolveAdjoint; dopri5 only (torchode has no rk4);
              the batch is flattened into one sample so it solves the same single ODE system

Measurements:

* time: median wall time of forward+backward over repeats, peers interleaved in the same process
  (``common.time_alternating``), 1 thread.
* peak RSS: growth of the process's resident set (VmHWM after - VmRSS before, see
  ``common.peak_rss_delta``) during one forward+backward, measured in a *fresh subprocess per
  peer and configuration* after a small warm-up.  This is what the OS sees: tensors, the autograd
  graph and allocator slack.
* saved tensors: peak bytes held by autograd's saved tensors (``common.SavedTensorMeter``) during a
  second forward+backward in that subprocess; allocator-independent and exactly reproducible, but
  blind to tensors kept outside autograd's saved-tensor mechanism; not available where torch.func is
  used (torchode's BacksolveAdjoint), which refuses saved-tensor hooks.
* gradient agreement: relative L2 difference of the concatenated gradient (parameters, y0) to
  fastode direct (or torchdiffeq odeint while fastode is unavailable).  For rk4 the discrete modes
  agree to float32 rounding; the continuous adjoint differs by the discretisation error.
* NFE forward / backward: RHS calls counted by a wrapper (backprop modes evaluate no RHS backward).

Run alone: ``python bench/gradient_modes.py [--quick]``; normally via ``bench/run.py``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEERS = ["fastode:direct", "fastode:checkpoint", "fastode:adjoint", "torchdiffeq:odeint",
         "torchdiffeq:odeint_adjoint", "torchode:AutoDiffAdjoint", "torchode:BacksolveAdjoint"]

PROFILES = {
    # smoke (tests/test_bench_smoke.py only): one memory measurement in a subprocess, the rest in-process
    "smoke": dict(batch=16, dim=4, hidden=16, gain=3.0, steps=[4], dopri5=True, tol=1e-3, repeats=2,
                  budget_s=1.0, max_subprocesses=1),
    "quick": dict(batch=256, dim=16, hidden=64, gain=3.0, steps=[10, 40], dopri5=True, tol=1e-6, repeats=3,
                  budget_s=3.0),
    "full": dict(batch=256, dim=16, hidden=64, gain=3.0, steps=[10, 40, 160, 640], dopri5=True, tol=1e-6,
                 repeats=5, budget_s=15.0),
}


def configs(cfg: dict) -> list[dict]:
    base = {k: cfg[k] for k in ("batch", "dim", "hidden", "gain")}
    out = [dict(base, method="rk4", steps=n) for n in cfg["steps"]]
    if cfg["dopri5"]:
        out.append(dict(base, method="dopri5", tol=cfg["tol"]))
    return out


def config_name(c: dict) -> str:
    return f"rk4 x{c['steps']}" if c["method"] == "rk4" else f"dopri5 tol {c['tol']:g}"


def build(peer: str, c: dict, seed: int = 0):
    """Return ``(run, counter, params)``: ``run()`` does forward+backward and returns the gradient list.

    Raises ``LookupError(reason)`` when the peer cannot run this configuration."""
    import torch
    from torch import nn

    lib, mode = peer.split(":")
    if lib == "torchode" and c["method"] != "dopri5":
        raise LookupError("torchode has no rk4")
    torch.manual_seed(seed)
    B, D, H = c["batch"], c["dim"], c["hidden"]

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(D + 1, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(),
                                     nn.Linear(H, D))
            self.nfe = 0

        def forward(self, t, y):
            self.nfe += 1
            tt = torch.as_tensor(t, dtype=y.dtype).reshape(-1, 1).expand(y.shape[0], 1)
            return self.net(torch.cat([y, tt], dim=1))

    func = MLP()
    for m in func.net:  # larger weights than PyTorch's default init: non-trivial dynamics for dopri5
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, c.get("gain", 3.0) / m.in_features ** 0.5)
    y0 = torch.randn(B, D, generator=torch.Generator().manual_seed(seed + 1)).requires_grad_(True)
    t = torch.tensor([0.0, 1.0])
    params = list(func.parameters())
    if c["method"] == "rk4":
        kw = dict(method="rk4", options={"step_size": 1.0 / c["steps"]})
    else:
        kw = dict(method="dopri5", rtol=c["tol"], atol=c["tol"])

    if lib == "fastode":
        odeint, why = common.fastode_odeint()
        if odeint is None:
            raise LookupError(why)

        def solve():
            return odeint(func, y0, t, gradient=mode, **kw)[-1]
    elif lib == "torchdiffeq":
        import torchdiffeq

        fn = torchdiffeq.odeint if mode == "odeint" else torchdiffeq.odeint_adjoint

        def solve():
            return fn(func, y0, t, **kw)[-1]
    elif lib == "torchode":
        import torchode as to

        class Flat(nn.Module):  # one sample = the whole batch (same ODE system as the other peers)
            def __init__(self):
                super().__init__()
                self.func = func

            def forward(self, tt, y):
                return self.func(tt, y.view(B, D)).reshape(y.shape)  # BacksolveAdjoint vmaps: y is (B*D,)

        term = to.ODETerm(Flat())
        step = to.Dopri5(term=term)
        ctrl = to.IntegralController(atol=c["tol"], rtol=c["tol"], term=term)
        if mode == "AutoDiffAdjoint":
            solver = to.AutoDiffAdjoint(step, ctrl)
        else:
            solver = to.BacksolveAdjoint(term, step, ctrl)

        def solve():
            ivp = to.InitialValueProblem(y0=y0.reshape(1, -1), t_start=t[:1], t_end=t[1:])
            sol = solver.solve(ivp)
            return sol.ys[0, -1].view(B, D)
    else:
        raise LookupError(f"unknown peer {peer}")

    counts = {"fwd": 0, "bwd": 0}

    def run():
        for p in params + [y0]:
            p.grad = None
        func.nfe = 0
        loss = solve().pow(2).mean()
        counts["fwd"] = func.nfe
        loss.backward()
        counts["bwd"] = func.nfe - counts["fwd"]
        return [p.grad.detach().clone() for p in params + [y0]]

    return run, counts


def rel_diff(g, g_ref) -> float:
    import torch

    a = torch.cat([x.reshape(-1).double() for x in g])
    b = torch.cat([x.reshape(-1).double() for x in g_ref])
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------- memory
def worker(spec: dict) -> dict:
    """Subprocess body: one peer, one configuration -> peak RSS growth and saved-tensor peak."""
    common.pin_threads(1)
    peer, c = spec["peer"], spec["config"]
    small = dict(c, steps=2) if c["method"] == "rk4" else c
    warm, _ = build(peer, small)
    warm()  # loads lazily initialised code paths (autograd engine, kernels) before measuring
    del warm
    run, counts = build(peer, c)
    peak, _ = common.peak_rss_delta(run)
    out = {"peak_rss_bytes": peak, "saved_peak_bytes": None, "nfe_fwd": counts["fwd"], "nfe_bwd": counts["bwd"]}
    meter = common.SavedTensorMeter()
    try:
        with meter:
            run()
        out["saved_peak_bytes"] = meter.peak_bytes
    except RuntimeError as exc:  # torch.func (torchode's BacksolveAdjoint) refuses saved-tensor hooks
        out["saved_failure"] = str(exc).splitlines()[0][:120]
    return out


def measure_memory(peer: str, c: dict, timeout: float = 300) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({"peer": peer, "config": c})]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"memory_failure": f"timeout after {timeout}s"}
    if proc.returncode != 0:
        return {"memory_failure": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- driver
def run_gradient_modes(profile: str = "quick", *, progress=None, log=print) -> dict:
    cfg = PROFILES[profile]
    rows, skipped, n_sub = [], {}, 0
    for c in configs(cfg):
        runners, grads, nfes, failures = {}, {}, {}, {}
        for peer in PEERS:
            try:
                runners[peer] = build(peer, c)
            except (LookupError, ImportError) as exc:
                skipped.setdefault(peer, {})[config_name(c)] = str(exc)
        ok = {}
        for peer, (run, counts) in runners.items():  # warm-up; gives gradients and NFE
            try:
                grads[peer] = run()
                nfes[peer] = dict(counts)
                ok[peer] = run
            except Exception as exc:  # noqa: BLE001
                failures[peer] = f"{type(exc).__name__}: {exc}"
        timings = common.time_alternating(ok, repeats=cfg["repeats"], warmup=0,
                                          budget_s=cfg["budget_s"]) if ok else {}
        ref = next((p for p in ("fastode:direct", "torchdiffeq:odeint", "torchode:AutoDiffAdjoint")
                    if p in grads), None)
        for peer in runners:
            lib, mode = peer.split(":")
            row = {"config": config_name(c), **c, "library": lib, "mode": mode,
                   "failure": failures.get(peer)}
            if peer in ok:
                tm = timings[peer]
                if n_sub < cfg.get("max_subprocesses", 10**9):
                    n_sub += 1
                    mem = measure_memory(peer, c)
                else:
                    try:
                        mem = worker({"peer": peer, "config": c})
                    except Exception as exc:  # noqa: BLE001
                        mem = {"memory_failure": f"{type(exc).__name__}: {exc}"}
                row.update({"time_s": tm.median, "time_iqr_s": list(tm.iqr), "cpu_s": tm.cpu_median,
                            "repeats": len(tm.samples),
                            "nfe_fwd": nfes[peer]["fwd"], "nfe_bwd": nfes[peer]["bwd"],
                            "grad_rel_diff": rel_diff(grads[peer], grads[ref]), "grad_reference": ref,
                            **mem})
            rows.append(row)
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"{config_name(c)} {peer}")
        del runners, ok, grads
    return {"profile": profile, "config": cfg, "rows": rows, "skipped": skipped}


def n_tasks(profile: str) -> int:
    cfg = PROFILES[profile]
    return len(configs(cfg)) * len(PEERS)


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = ["## Gradient modes: forward + backward of a batched neural ODE (float32, CPU, 1 thread)", "",
             f"MLP([y, t]) tanh {cfg['dim']}+1 -> {cfg['hidden']} -> {cfg['hidden']} -> {cfg['dim']}, "
             f"batch {cfg['batch']}, t in [0, 1], loss = mean(y(1)^2).  Time: median forward+backward "
             "(peers interleaved) and its process CPU time.  Peak RSS: resident-set growth during one forward+backward in a fresh "
             "subprocess.  Saved: peak bytes of autograd saved tensors.  Grad diff: relative L2 "
             "difference of d loss / d (params, y0) to the reference mode.", ""]
    table = []
    for r in result["rows"]:
        if r.get("failure"):
            table.append({"config": r["config"], "peer": f"{r['library']} {r['mode']}", "time_ms": "failed: "
                          + r["failure"][:80]})
            continue
        mib = lambda b: None if b is None else b / 2**20  # noqa: E731
        table.append({"config": r["config"], "peer": f"{r['library']} {r['mode']}",
                      "time_ms": 1e3 * r["time_s"], "cpu_ms": 1e3 * r["cpu_s"],
                      "rss": mib(r.get("peak_rss_bytes")),
                      "saved": mib(r.get("saved_peak_bytes")), "nfe": f"{r['nfe_fwd']} / {r['nfe_bwd']}",
                      "grad": r["grad_rel_diff"], "ref": r["grad_reference"]})
    lines.append(common.markdown_table(table, {"config": "config", "peer": "peer", "time_ms": "time [ms]",
                                               "cpu_ms": "CPU time [ms]",
                                               "rss": "peak RSS [MiB]", "saved": "saved tensors [MiB]",
                                               "nfe": "NFE fwd / bwd", "grad": "grad diff",
                                               "ref": "grad reference"}))
    lines += ["", pivot(result), ""]
    for r in result["rows"]:
        if r.get("memory_failure"):
            lines.append(f"- memory measurement failed for {r['config']} {r['library']} {r['mode']}: "
                         f"{r['memory_failure']}")
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(
            f"{peer} ({', '.join(cs)}): {next(iter(cs.values()))}" for peer, cs in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def pivot(result: dict) -> str:
    """rk4 rows as a peer x steps table: 'peak RSS MiB / time ms' (memory growth vs number of steps)."""
    rows = [r for r in result["rows"] if r["method"] == "rk4" and not r.get("failure") and r.get("time_s")]
    steps = sorted({r["steps"] for r in rows})
    table = []
    for peer in dict.fromkeys((r["library"], r["mode"]) for r in rows):
        row = {"peer": " ".join(peer)}
        for r in rows:
            if (r["library"], r["mode"]) == peer:
                rss = r.get("peak_rss_bytes")
                row[r["steps"]] = f"{common.fmt(None if rss is None else rss / 2**20)} / {common.fmt(1e3 * r['time_s'])}"
        table.append(row)
    return ("rk4, peak RSS growth [MiB] / forward+backward time [ms] vs number of steps:\n\n"
            + common.markdown_table(table, {"peer": "peer", **{n: f"{n} steps" for n in steps}}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--quick", action="store_const", const="quick", dest="profile")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    common.pin_threads(1)
    meta = common.metadata()
    res = run_gradient_modes(args.profile)
    meta["loadavg_end"] = common.loadavg()
    common.write_json(args.out / "gradient_modes.json", {"meta": meta, **res})
    common.write_text(args.out / "gradient_modes.md", common.metadata_markdown(meta) + "\n\n" + markdown(res))


if __name__ == "__main__":
    main()
