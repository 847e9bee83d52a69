"""Work-precision benchmark: final-time error vs function evaluations and vs wall time.

For every problem (``problems.py``) and tolerance (rtol = atol = tol), each library/method pair solves
the problem in float64 on the CPU; we record the relative L2 error of y(t1) against the reference, the
number of right-hand-side evaluations (counted by one wrapper around the RHS, identical for every
library) and the median wall time of repeated solves (peers interleaved, order rotated per repeat,
see ``common.time_alternating``).

Peers and methods (same Butcher pair grouped on one line):

    fastode      dopri5  tsit5  bosh3  dopri8
    torchdiffeq  dopri5         bosh3  dopri8
    torchode     dopri5  tsit5                    (eager, IntegralController = classic I controller)
    scipy        RK45           RK23   DOP853     (NumPy right-hand side)

bosh3 / RK23 (3rd order) only run at tol >= 1e-7.

torchode works on (batch, features) with per-sample step sizes; the batched ``neural_ode`` problem is
flattened to a single sample for it so that every library solves the same single ODE system.

Run alone: ``python bench/work_precision.py [--quick]``; normally via ``bench/run.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from problems import get_problem, rel_error  # noqa: E402

METHODS = {
    "fastode": ["dopri5", "tsit5", "bosh3", "dopri8"],
    "torchdiffeq": ["dopri5", "bosh3", "dopri8"],
    "torchode": ["dopri5", "tsit5"],
    "scipy": ["RK45", "RK23", "DOP853"],
}
# the Butcher pair behind each scipy method (for grouping / ratios)
PAIR = {"RK45": "dopri5", "RK23": "bosh3", "DOP853": "dopri8"}
# low-order pairs are not run below this tolerance (tens of thousands of steps; not what they are for)
MIN_TOL = {"bosh3": 1e-7}

PROFILES = {
    # problems, tolerances, methods per library (None = all), repeats, time budget per (problem, tol) group
    "smoke": dict(problems=["linear"], tols=[1e-3, 1e-5], methods=["dopri5", "RK45"], repeats=2,
                  budget_s=1.0),
    "quick": dict(problems=["cubic_spiral", "van_der_pol", "neural_ode"],
                  tols=[1e-3, 1e-6, 1e-9], methods=["dopri5", "tsit5", "RK45"], repeats=3,
                  budget_s=3.0),
    "full": dict(problems=["cubic_spiral", "van_der_pol", "lotka_volterra", "linear", "neural_ode"],
                 tols=[1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10], methods=None, repeats=5,
                 budget_s=4.0),
}


class Counter:
    """Counts right-hand-side calls."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, t, y):
        self.n += 1
        return self.f(t, y)


def make_runner(library: str, method: str, problem, tol: float):
    """Return ``run() -> (y1 as ndarray (batch, dim), nfe)``, or raise ``LookupError(reason)`` to skip."""
    import torch

    dtype = torch.float64
    t = torch.tensor([problem.t0, problem.t1], dtype=dtype)
    if library == "scipy":
        from scipy.integrate import solve_ivp

        y0 = problem.y0.ravel().copy()
        rhs = Counter(problem.rhs_numpy)

        def run():
            rhs.n = 0
            sol = solve_ivp(rhs, (problem.t0, problem.t1), y0, method=method, rtol=tol, atol=tol)
            if not sol.success:
                raise RuntimeError(sol.message)
            return sol.y[:, -1].reshape(problem.y0.shape), rhs.n
        return run

    f = Counter(problem.make_rhs_torch(dtype))
    y0 = problem.y0_torch(dtype)
    if library == "fastode":
        odeint, why = common.fastode_odeint()
        if odeint is None:
            raise LookupError(why)

        def run():
            f.n = 0
            with torch.no_grad():
                y = odeint(f, y0, t, rtol=tol, atol=tol, method=method)
            return y[-1].numpy(), f.n
        return run
    if library == "torchdiffeq":
        import torchdiffeq

        def run():
            f.n = 0
            with torch.no_grad():
                y = torchdiffeq.odeint(f, y0, t, rtol=tol, atol=tol, method=method)
            return y[-1].numpy(), f.n
        return run
    if library == "torchode":
        import torchode as to

        shape = y0.shape

        def flat(tt, y):  # one sample holding the whole batch: same ODE system as the others
            return f(tt, y.view(shape)).reshape(1, -1)

        term = to.ODETerm(flat)
        step = {"dopri5": to.Dopri5, "tsit5": to.Tsit5}[method](term=term)
        solver = to.AutoDiffAdjoint(step, to.IntegralController(atol=tol, rtol=tol, term=term))
        ivp = to.InitialValueProblem(y0=y0.reshape(1, -1), t_start=t[:1], t_end=t[1:])

        def run():
            f.n = 0
            with torch.no_grad():
                sol = solver.solve(ivp)
            if int(sol.status.max()) != 0:
                raise RuntimeError(f"torchode status {sol.status.tolist()}")
            return sol.ys[0, -1].reshape(shape).numpy(), f.n
        return run
    raise LookupError(f"unknown library {library}")


def run_work_precision(profile: str = "quick", *, progress=None, log=print) -> dict:
    """Run the work-precision sweep of ``profile``; returns a JSON-able dict (records + skips)."""
    cfg = PROFILES[profile]
    pairs = [(lib, m) for lib, ms in METHODS.items() for m in ms
             if cfg["methods"] is None or m in cfg["methods"]]
    records, skipped, references = [], {}, {}
    for pname in cfg["problems"]:
        problem = get_problem(pname)
        y_ref, ref_err, ref_how = problem.reference()
        references[pname] = {"description": problem.description, "reference_error": ref_err,
                             "how": ref_how, "y_ref": y_ref.ravel()[:8].tolist()}
        for tol in cfg["tols"]:
            runners, results = {}, {}
            for lib, m in pairs:
                key = f"{lib}:{m}"
                if tol < MIN_TOL.get(PAIR.get(m, m), 0.0):
                    continue
                try:
                    runners[key] = make_runner(lib, m, problem, tol)
                except (LookupError, ImportError) as exc:
                    skipped[key] = str(exc)
            # warm-up call doubles as the accuracy / NFE measurement (solves are deterministic)
            ok = {}
            for key, run in runners.items():
                try:
                    y1, nfe = run()
                    results[key] = (rel_error(y1, y_ref), nfe, None)
                    ok[key] = run
                except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking
                    results[key] = (float("nan"), None, f"{type(exc).__name__}: {exc}")
            timings = common.time_alternating(ok, repeats=cfg["repeats"], warmup=0,
                                              budget_s=cfg["budget_s"]) if ok else {}
            for key, (err, nfe, failure) in results.items():
                lib, m = key.split(":")
                tm = timings.get(key)
                records.append({
                    "problem": pname, "library": lib, "method": m, "pair": PAIR.get(m, m),
                    "rtol": tol, "atol": tol, "error": err, "nfe": nfe,
                    "time_s": tm.median if tm else None, "time_iqr_s": list(tm.iqr) if tm else None,
                    "cpu_s": tm.cpu_median if tm else None,
                    "repeats": len(tm.samples) if tm else 0, "failure": failure,
                })
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"{pname} tol={tol:g}")
    return {"profile": profile, "config": {k: v for k, v in cfg.items()}, "references": references,
            "records": records, "skipped": skipped}


# ----------------------------------------------------------------------------------------------- reports
def ratios(result: dict, peer: str, peer_method: str, method: str = "dopri5") -> list[dict]:
    """Per (problem, tol): peer's time and NFE divided by fastode's (same pair, same tolerance)."""
    by = {(r["problem"], r["rtol"], r["library"], r["method"]): r for r in result["records"]}
    out = []
    for (p, tol, lib, m), r in by.items():
        if lib != "fastode" or m != method:
            continue
        q = by.get((p, tol, peer, peer_method))
        if q is None or not r["time_s"] or not q["time_s"] or not r["nfe"] or not q["nfe"]:
            continue
        out.append({"problem": p, "tol": tol, "time_ratio": q["time_s"] / r["time_s"],
                    "cpu_ratio": q["cpu_s"] / r["cpu_s"] if q.get("cpu_s") and r.get("cpu_s") else None,
                    "nfe_ratio": q["nfe"] / r["nfe"], "fastode_error": r["error"], "peer_error": q["error"]})
    return out


def markdown(result: dict) -> str:
    lines = ["## Work-precision (float64, CPU, rtol = atol = tol)", "",
             "Cells: relative L2 error of y(t1) / number of RHS evaluations / median wall time. "
             "Peers interleaved in each repeat; medians over the repeats given in the JSON.", ""]
    for pname, ref in result["references"].items():
        recs = [r for r in result["records"] if r["problem"] == pname]
        tols = sorted({r["rtol"] for r in recs}, reverse=True)
        keys = list(dict.fromkeys((r["library"], r["method"]) for r in recs))
        lines += [f"### {pname}: {ref['description']}", "",
                  f"Reference: {ref['how']}; estimated reference error {ref['reference_error']:.1e}.", ""]
        rows = []
        for lib, m in keys:
            row = {"solver": f"{lib} {m}"}
            for tol in tols:
                r = next((x for x in recs if x["library"] == lib and x["method"] == m and x["rtol"] == tol), None)
                if r is None:
                    continue
                row[tol] = ("failed" if r["failure"] else
                            f"{common.fmt(r['error'], 2)} / {r['nfe']} / {common.fmt(1e3 * r['time_s'], 3)} ms")
            rows.append(row)
        lines += [common.markdown_table(rows, {"solver": "solver", **{t: f"tol {t:g}" for t in tols}}), ""]
        failures = [r for r in recs if r["failure"]]
        for r in failures:
            lines.append(f"- {r['library']} {r['method']} tol {r['rtol']:g} failed: {r['failure']}")
        if failures:
            lines.append("")
    if result["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()), ""]
    for peer, pm in (("torchdiffeq", "dopri5"), ("torchode", "dopri5"), ("scipy", "RK45")):
        rs = ratios(result, peer, pm)
        if rs:
            lines.append(f"- {peer} {pm} / fastode dopri5 at equal tolerance: wall time x"
                         f"{common.geomean(r['time_ratio'] for r in rs):.2f}, CPU time x"
                         f"{common.geomean(r['cpu_ratio'] for r in rs):.2f}, NFE x"
                         f"{common.geomean(r['nfe_ratio'] for r in rs):.2f} (geometric mean over "
                         f"{len(rs)} problem/tolerance pairs; >1 means fastode is faster/cheaper)")
    return "\n".join(lines) + "\n"


STYLE = {"fastode": "tab:red", "torchdiffeq": "tab:blue", "torchode": "tab:green", "scipy": "tab:gray"}
LINESTYLE = {"dopri5": "-", "tsit5": "--", "bosh3": ":", "dopri8": "-."}
MARKER = {"fastode": "o", "torchdiffeq": "s", "torchode": "^", "scipy": "x"}


def plot(result: dict, out_dir: Path, meta: dict | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = []
    for pname, ref in result["references"].items():
        recs = [r for r in result["records"] if r["problem"] == pname and not r["failure"]]
        fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.4))
        for (lib, m) in dict.fromkeys((r["library"], r["method"]) for r in recs):
            rs = sorted((r for r in recs if r["library"] == lib and r["method"] == m), key=lambda r: -r["rtol"])
            err = [max(r["error"], 1e-17) for r in rs]
            label = f"{lib} {m}" + (f" ({PAIR[m]})" if m in PAIR else "")
            kw = dict(color=STYLE.get(lib), ls=LINESTYLE.get(PAIR.get(m, m), "-"), marker=MARKER.get(lib),
                      ms=4, lw=1.3, label=label)
            axes[0].plot([r["nfe"] for r in rs], err, **kw)
            axes[1].plot([r["time_s"] for r in rs], err, **kw)
        for ax, xl in zip(axes, ("RHS evaluations", "wall time [s] (median)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xl)
            ax.set_ylabel("relative error of y(t1)")
            ax.axhline(max(ref["reference_error"], 1e-17), color="k", lw=0.6, ls=":", label="reference error")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.25)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="center right")
        title = f"{pname}: {ref['description']}"
        if meta:
            title += f"\n{meta['machine'].get('model_name', '')}, 1 thread, load {meta['loadavg_1_5_15'][0]}"
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0, 0.85, 1))
        path = out_dir / f"work_precision_{pname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--quick", action="store_const", const="quick", dest="profile")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = ap.parse_args(argv)
    common.pin_threads(1)
    meta = common.metadata()
    res = run_work_precision(args.profile)
    meta["loadavg_end"] = common.loadavg()
    common.write_json(args.out / "work_precision.json", {"meta": meta, **res})
    common.write_text(args.out / "work_precision.md", common.metadata_markdown(meta) + "\n\n" + markdown(res))
    plot(res, args.out, meta)


if __name__ == "__main__":
    main()
