#!/usr/bin/env python
"""Reproduce the headline claims of the five papers behind fastode's CNF accelerators, at CPU scale.

    python bench/papers/run.py                 # everything (~the time stated in bench/results/papers.md)
    python bench/papers/run.py --only rnode    # one paper (names: onken, rnode, taynode, toflow, pal)
    python bench/papers/run.py --quick         # a smoke run of a few minutes (tiny iteration counts)

Each experiment trains the same seeded model with the accelerator on and off and writes, next to the paper's
reported number, what fastode measured and a verdict computed from the measurements by a stated rule
(``reproduced`` / ``partly`` / ``not reproduced``, with the reason). Output: ``papers.md``, ``papers.json`` and
``papers_*.png`` in ``--out`` (default bench/results; ``--only`` and ``--quick`` add a suffix to the names so
that a partial run never overwrites the full one).
"""
from __future__ import annotations

import os
import sys

# Thread pinning must precede ``import torch`` (see bench/common.py).
if __name__ == "__main__":
    _threads = "1"
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            _threads = sys.argv[i + 1]
    for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_v, _threads)

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import common  # noqa: E402  (bench/common.py)
import harness as H  # noqa: E402

PAPERS = {  # name -> module, in the order of the report
    "onken": "onken",
    "rnode": "rnode",
    "taynode": "taynode",
    "toflow": "toflow",
    "pal": "pal",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help=f"comma-separated papers to run: {', '.join(PAPERS)}")
    p.add_argument("--quick", action="store_true", help="smoke run: a few iterations per arm (minutes)")
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="output directory (default: bench/results)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, pinned)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="no training: rewrite the Markdown report of a saved papers*.json next to it")
    args = p.parse_args(argv)
    names = list(PAPERS) if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [n for n in names if n not in PAPERS]
    if unknown:
        p.error(f"unknown paper(s) {unknown}; choose from {', '.join(PAPERS)}")
    args.names = names
    return args


def render(path: Path) -> Path:
    """Rewrite ``papers*.md`` from its JSON (same content; e.g. after a change of the report's layout)."""
    data = json.loads(path.read_text())
    modules = {n: importlib.import_module(PAPERS[n]) for n in data["wall_s"]}
    scale = H.Scale(**data["meta"]["scale"])
    verdicts = [H.Verdict(**v) for v in data["verdicts"]]
    md = path.with_suffix(".md")
    common.write_text(md, report(data["meta"], scale, data["wall_s"], data["total_wall_s"], verdicts, data["results"],
                                 data["plots"], modules))
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        print(f"wrote {render(Path(args.render))}")
        return 0
    common.pin_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    scale = H.Scale.of(args.quick)
    modules = {n: importlib.import_module(PAPERS[n]) for n in args.names}
    suffix = ("" if args.only is None else "-" + "-".join(args.names)) + ("-quick" if args.quick else "")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = common.metadata(command=" ".join(["python bench/papers/run.py", *(argv if argv is not None else sys.argv[1:])]),
                           scale=scale.__dict__, seeds={"weights": 0, "toy stream": 0, "toy test": 12345,
                                                        "breast_cancer split": 42, "time series": 1234})
    cache = H.RunCache()
    arms = {k: n for m in modules.values() for k, n in m.arms(scale).items()}  # shared arms train once
    bar = tqdm(total=sum(arms.values()), disable=args.no_progress, unit="it", dynamic_ncols=True)
    results, verdicts, walls, plots = {}, [], {}, {}
    t_all = time.perf_counter()
    for name, mod in modules.items():
        bar.set_description(name)
        t0 = time.perf_counter()
        results[name], v = mod.run(scale, cache, bar.update, plots)
        walls[name] = time.perf_counter() - t0
        verdicts += v
    bar.close()
    total = time.perf_counter() - t_all
    meta["loadavg_end"] = common.loadavg()
    files = []
    for key, (fn, fargs) in plots.items():
        fig = fn(*fargs)
        path = out_dir / f"papers_{key}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    payload = {"meta": meta, "wall_s": walls, "total_wall_s": total, "verdicts": [v.as_dict() for v in verdicts],
               "results": results, "plots": files,
               "runs": {k: r.as_dict() for k, r in cache.runs.items() if hasattr(r, "as_dict")}}
    common.write_json(out_dir / f"papers{suffix}.json", payload)
    common.write_text(out_dir / f"papers{suffix}.md", report(meta, scale, walls, total, verdicts, results, files,
                                                            modules))
    print(f"wrote {out_dir / f'papers{suffix}.md'} ({total / 60:.1f} min)")
    return 0


def _cells(rows):
    """Rows with ``|`` escaped in text cells (norms such as ||f|| would split a Markdown table)."""
    return [{k: v.replace("|", "\\|") if isinstance(v, str) else v for k, v in r.items()} for r in rows]


def report(meta, scale, walls, total, verdicts, results, files, modules) -> str:
    lines = ["# The five papers, reproduced with fastode", "",
             "Generated by `python bench/papers/run.py" + (" --quick" if scale.quick else "") + "`. Every arm of a "
             "comparison starts from the same seeded weights and sees the same batches; timings are the training "
             "loop's wall clock on one pinned thread. Verdicts follow the rule stated in each row's reason; they are "
             "computed, not edited.", "", common.metadata_markdown(meta),
             f"- suite wall time: {total / 60:.1f} min (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in walls.items())
             + " min)", f"- scale: {scale.__dict__}", "", "## Summary", "",
             common.markdown_table(_cells([v.as_dict() for v in verdicts]),
                                   {"paper": "paper", "experiment": "experiment", "paper_value": "paper reports",
                                    "measured": "fastode measured", "verdict": "verdict", "why": "why / how"}), ""]
    for name, mod in modules.items():
        lines += [f"## {mod.PAPER}", "", mod.__doc__.strip(), ""]
        for key, part in results[name].items():
            rows = part.get("rows") if isinstance(part, dict) else None
            if rows:
                cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r.get(k), (dict, list))))
                lines += [f"### {key}", "", common.markdown_table(_cells(rows), cols), ""]
        mine = [f for f in files if f.startswith(f"papers_{name}")]
        lines += [f"![{f}]({f})" for f in mine] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
