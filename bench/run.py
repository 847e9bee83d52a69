"""One command for fastode's benchmarks: ``python bench/run.py [--quick]``.

Runs the work-precision sweep (``work_precision.py``) and the gradient-mode comparison
(``gradient_modes.py``) with a progress bar, single-threaded, and writes to ``bench/results/``
(or ``--out``):

    work_precision.json / .md, work_precision_<problem>.png    error vs NFE and vs wall time
    gradient_modes.json / .md, gradient_modes.png              time + peak memory vs number of steps
    SUMMARY.md                                                  headline numbers, machine, versions, load

``--quick`` (about 2 minutes) uses fewer problems, tolerances and step counts; the full run takes
about 10-15 minutes on a 2-core machine.  Every file records the machine, library versions, the git
commit and the load average, because timings on a shared machine are only comparable within one run.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # before importing torch
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gradient_modes  # noqa: E402
import work_precision  # noqa: E402


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True)


def plot_gradient_modes(result: dict, out_dir: Path, meta: dict | None = None) -> Path | None:
    rows = [r for r in result["rows"] if r["method"] == "rk4" and not r.get("failure") and r.get("time_s")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"fastode": "tab:red", "torchdiffeq": "tab:blue", "torchode": "tab:green"}
    styles = {"direct": "-", "odeint": "-", "checkpoint": "--", "adjoint": ":", "odeint_adjoint": ":"}
    for peer in dict.fromkeys((r["library"], r["mode"]) for r in rows):
        rs = sorted((r for r in rows if (r["library"], r["mode"]) == peer), key=lambda r: r["steps"])
        kw = dict(color=colors.get(peer[0]), ls=styles.get(peer[1], "-"), marker="o", ms=4, label=" ".join(peer))
        axes[0].plot([r["steps"] for r in rs], [r["time_s"] for r in rs], **kw)
        mem = [(r["steps"], r["peak_rss_bytes"] / 2**20) for r in rs if r.get("peak_rss_bytes") is not None]
        if mem:
            axes[1].plot(*zip(*mem), **kw)
    steps = sorted({r["steps"] for r in rows})
    for ax, yl in zip(axes, ("forward+backward time [s] (median)", "peak RSS growth [MiB]")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(steps, [str(n) for n in steps])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("rk4 steps")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.25)
    axes[1].legend(fontsize=8)
    cfg = result["config"]
    title = (f"gradient modes: neural ODE, batch {cfg['batch']}, dim {cfg['dim']}, hidden {cfg['hidden']}, "
             "float32, CPU 1 thread")
    if meta:
        title += f"; load {meta['loadavg_1_5_15'][0]}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out_dir / "gradient_modes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def headline(wp: dict | None, gm: dict | None) -> list[str]:
    """A few sentences with the numbers worth quoting (README material)."""
    out = []
    if wp is not None:
        parts = []
        for peer, pm in (("torchdiffeq", "dopri5"), ("torchode", "dopri5"), ("scipy", "RK45")):
            rs = work_precision.ratios(wp, peer, pm)
            if rs:
                parts.append((peer, pm, common.geomean(r["time_ratio"] for r in rs),
                              common.geomean(r["nfe_ratio"] for r in rs),
                              common.geomean(r["peer_error"] / r["fastode_error"] for r in rs if r["fastode_error"]),
                              len(rs)))
        if parts:
            n = parts[0][5]
            txt = "; ".join(f"{peer} {pm} takes x{t:.2f} fastode's wall time (NFE x{nf:.2f}, error x{e:.2f})"
                            for peer, pm, t, nf, e, _ in parts)
            out.append(f"- **Forward solves** (dopri5, float64, 1 CPU thread, {n} problem/tolerance pairs, "
                       f"geometric means at equal rtol = atol): {txt}.")
    if gm is not None:
        rows = [r for r in gm["rows"] if not r.get("failure") and r.get("time_s") and r["method"] == "rk4"]
        if rows:
            n = max(r["steps"] for r in rows)
            by = {(r["library"], r["mode"]): r for r in rows if r["steps"] == n}
            mib = lambda r: (r.get("peak_rss_bytes") or float("nan")) / 2**20  # noqa: E731
            cells = [f"{lib} {mode} {r['time_s']:.2f} s / {mib(r):.1f} MiB" for (lib, mode), r in by.items()]
            out.append(f"- **Gradients** (neural ODE, batch {gm['config']['batch']}, rk4 x{n}, forward+backward, "
                       f"time / peak RSS growth): " + "; ".join(cells) + ".")
            d, c, a = by.get(("fastode", "direct")), by.get(("fastode", "checkpoint")), by.get(("fastode", "adjoint"))
            if d and c:
                out.append(f"- fastode `gradient=\"checkpoint\"` needs x{mib(d) / mib(c):.0f} less memory than "
                           f"`\"direct\"` at {n} steps for x{c['time_s'] / d['time_s']:.2f} its time, with the same "
                           f"gradient (relative difference {c['grad_rel_diff']:.1e}).")
            t = by.get(("torchdiffeq", "odeint"))
            if d and t:
                out.append(f"- fastode direct vs torchdiffeq odeint at {n} steps: x{t['time_s'] / d['time_s']:.2f} "
                           f"speed-up, peak RSS x{mib(d) / mib(t):.2f}.")
            ta = by.get(("torchdiffeq", "odeint_adjoint"))
            if a and ta:
                out.append(f"- fastode adjoint vs torchdiffeq odeint_adjoint at {n} steps: "
                           f"x{ta['time_s'] / a['time_s']:.2f} speed-up, peak RSS {mib(a):.1f} vs {mib(ta):.1f} MiB.")
    return out


def summary(wp_meta: dict | None, wp: dict | None, gm_meta: dict | None, gm: dict | None) -> str:
    """SUMMARY.md; each part carries the metadata of the run that measured it (they may differ: ``--only``)."""
    lines = ["# fastode benchmark summary", ""]
    if wp_meta is not None and gm_meta is not None and wp_meta.get("timestamp_utc") != gm_meta.get("timestamp_utc"):
        lines += ["The two parts were measured in different runs; each section names its own.", ""]
    else:
        lines += [common.metadata_markdown(wp_meta or gm_meta), ""]
        wp_meta = gm_meta = None   # said once above
    head = headline(wp, gm)
    if head:
        lines += ["## Headline", ""] + head + [""]
    if wp is not None:
        lines += ["## Work-precision (forward solves, float64, rtol = atol)", ""]
        if wp_meta is not None:
            lines += [common.metadata_markdown(wp_meta), ""]
        if any(k.startswith("fastode") for k in wp["skipped"]):
            lines += [f"fastode was not measured: {next(v for k, v in wp['skipped'].items() if k.startswith('fastode'))}", ""]
        for peer, pm in (("torchdiffeq", "dopri5"), ("torchdiffeq", "bosh3"), ("torchode", "dopri5"),
                         ("scipy", "RK45")):
            method = work_precision.PAIR.get(pm, pm)
            rs = work_precision.ratios(wp, peer, pm, method)
            if not rs:
                continue
            err = common.geomean(r["peer_error"] / r["fastode_error"] for r in rs if r["fastode_error"])
            lines.append(f"- fastode {method} vs {peer} {pm}, same tolerance: {peer} takes "
                         f"x{common.geomean(r['time_ratio'] for r in rs):.2f} the wall time "
                         f"(range {min(r['time_ratio'] for r in rs):.2f}-{max(r['time_ratio'] for r in rs):.2f}; "
                         f"CPU time x{common.geomean(r['cpu_ratio'] for r in rs):.2f}) "
                         f"and x{common.geomean(r['nfe_ratio'] for r in rs):.2f} the RHS evaluations; "
                         f"its error is x{err:.2f} fastode's (geometric means over {len(rs)} problem/tolerance pairs)")
        peers = (("torchdiffeq", "dopri5"), ("torchode", "dopri5"), ("scipy", "RK45"))
        table = []
        for problem in wp["references"]:
            row = {"problem": problem}
            for peer, pm in peers:
                rs = [r for r in work_precision.ratios(wp, peer, pm) if r["problem"] == problem]
                if rs:
                    row[peer] = common.geomean(r["time_ratio"] for r in rs)
            table.append(row)
        if any(len(r) > 1 for r in table):
            lines += ["", "Wall time of the peer / wall time of fastode dopri5 at the same tolerance (geometric "
                      "mean over tolerances; > 1: fastode is faster):", "",
                      common.markdown_table(table, {"problem": "problem", **{p: f"{p} {m}" for p, m in peers}})]
        lines += ["", "Plots: `work_precision_<problem>.png`; full table: `work_precision.md`.", ""]
    if gm is not None:
        lines += ["## Gradient modes (neural ODE, forward + backward, float32)", ""]
        if gm_meta is not None:
            lines += [common.metadata_markdown(gm_meta), ""]
        rows = [r for r in gm["rows"] if not r.get("failure") and r.get("time_s")]
        lines += [gradient_modes.pivot(gm), ""]
        for config in dict.fromkeys(r["config"] for r in rows if r["method"] != "rk4"):
            rs = [r for r in rows if r["config"] == config]
            lines.append(f"- {config}: " + "; ".join(
                f"{r['library']} {r['mode']} {1e3 * r['time_s']:.0f} ms, "
                f"{common.fmt((r.get('peak_rss_bytes') or float('nan')) / 2**20)} MiB"
                for r in rs))
        by = {(r["config"], r["library"], r["mode"]): r for r in rows}
        for config in dict.fromkeys(r["config"] for r in rows):
            for (a, b) in ((("fastode", "direct"), ("torchdiffeq", "odeint")),
                           (("fastode", "checkpoint"), ("torchdiffeq", "odeint")),
                           (("fastode", "adjoint"), ("torchdiffeq", "odeint_adjoint")),
                           (("fastode", "checkpoint"), ("fastode", "direct"))):
                ra, rb = by.get((config, *a)), by.get((config, *b))
                if ra and rb:
                    mem = ""
                    if ra.get("peak_rss_bytes") and rb.get("peak_rss_bytes"):
                        mem = f"; its peak RSS is x{ra['peak_rss_bytes'] / rb['peak_rss_bytes']:.2f} of the latter's"
                    lines.append(f"- {config}: {' '.join(a)} vs {' '.join(b)}: speed-up "
                                 f"x{rb['time_s'] / ra['time_s']:.2f} (CPU time x{rb['cpu_s'] / ra['cpu_s']:.2f})"
                                 f"{mem}")
        worst = [(r["grad_rel_diff"], r) for r in rows if r["library"] == "fastode" and r["mode"] == "checkpoint"]
        if worst:
            d, r = max(worst, key=lambda x: x[0])
            lines.append(f"- fastode checkpoint vs direct gradients: max relative difference {d:.1e} ({r['config']})")
        failed = {f"{r['library']} {r['mode']}": r["failure"] for r in gm["rows"] if r.get("failure")}
        for peer, why in failed.items():
            lines.append(f"- {peer} failed: {why[:160]}")
        if gm["skipped"]:
            lines.append("- not measured: " + ", ".join(f"{p} ({', '.join(cs)})" for p, cs in gm["skipped"].items()))
        lines += ["", "Full table: `gradient_modes.md`; plot: `gradient_modes.png`.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="fastode benchmarks (work-precision + gradient modes)")
    ap.add_argument("--quick", action="store_true", help="about 2 minutes instead of about 15")
    ap.add_argument("--smoke", action="store_true", help="seconds; for tests/test_bench_smoke.py")
    ap.add_argument("--only", choices=("work_precision", "gradient_modes"), help="run one part")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output folder")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--replot", action="store_true",
                    help="measure nothing: rebuild the .md, .png and SUMMARY.md in --out from its JSON files")
    args = ap.parse_args(argv)
    if args.replot:
        return write_reports(args.out, _load(args.out))
    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    common.pin_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = common.metadata(profile=profile)
    t0 = time.perf_counter()
    measured = {}
    if args.only in (None, "work_precision"):
        cfg = work_precision.PROFILES[profile]
        bar = _progress(len(cfg["problems"]) * len(cfg["tols"]), "work-precision", not args.no_progress)
        measured["work_precision"] = work_precision.run_work_precision(profile, progress=bar)
        if bar is not None:
            bar.close()
    if args.only in (None, "gradient_modes"):
        bar = _progress(gradient_modes.n_tasks(profile), "gradient modes", not args.no_progress)
        measured["gradient_modes"] = gradient_modes.run_gradient_modes(profile, progress=bar)
        if bar is not None:
            bar.close()
    meta["loadavg_end"] = common.loadavg()
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    files = [common.write_json(args.out / f"{name}.json", {"meta": meta, **data}) for name, data in measured.items()]
    # --only: the other part's earlier results (if any) stay in SUMMARY.md, with their own metadata
    parts = {**_load(args.out, required=False), **{name: (meta, data) for name, data in measured.items()}}
    return write_reports(args.out, parts, files)


PARTS = ("work_precision", "gradient_modes")


def _load(out: Path, required: bool = True) -> dict:
    """``{part: (meta, results)}`` from the JSON files in ``out``."""
    import json

    parts = {}
    for name in PARTS:
        path = out / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            parts[name] = (data.pop("meta"), data)
    if required and not parts:
        raise SystemExit(f"no work_precision.json / gradient_modes.json in {out}")
    return parts


def write_reports(out: Path, parts: dict, files=None) -> dict:
    """Markdown, PNG and SUMMARY.md from the results ``{part: (meta, results)}``."""
    files = list(files or [])

    def head(meta):
        return (common.metadata_markdown(meta)
                + f"\n- elapsed: {meta.get('elapsed_s')} s, profile: {meta.get('profile')}\n\n")

    wp_meta, wp = parts.get("work_precision", (None, None))
    gm_meta, gm = parts.get("gradient_modes", (None, None))
    if wp is not None:
        files.append(common.write_text(out / "work_precision.md", head(wp_meta) + work_precision.markdown(wp)))
        files += work_precision.plot(wp, out, wp_meta)
    if gm is not None:
        files.append(common.write_text(out / "gradient_modes.md", head(gm_meta) + gradient_modes.markdown(gm)))
        png = plot_gradient_modes(gm, out, gm_meta)
        if png:
            files.append(png)
    files.append(common.write_text(out / "SUMMARY.md", summary(wp_meta, wp, gm_meta, gm)))
    last = gm_meta or wp_meta
    print(f"wrote {len(files)} files to {out} (run took {last.get('elapsed_s')} s; "
          f"load average {last['loadavg_1_5_15']} -> {last.get('loadavg_end')})")
    return {"meta": last, "work_precision": wp, "gradient_modes": gm, "files": [str(f) for f in files]}


if __name__ == "__main__":
    main()
