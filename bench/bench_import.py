"""Import time: ``import fastode`` against ``import torch`` and ``import torchdiffeq``, each in fresh interpreters.

What a drop-in user pays before the first solve. Each statement runs in a new process (no module cached in the
interpreter; the OS file cache warm after the first run), timed inside the process with ``time.perf_counter``;
medians of ``--repeats`` runs, the statements interleaved. Also records whether ``torch._dynamo`` / Triton got
imported (fastode loads them only on a compiled or Triton path).

    python bench/bench_import.py            # -> bench/results/import_time.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

STATEMENTS = {
    "import torch": "import torch",
    "import torchdiffeq": "import torch; import torchdiffeq",
    "import fastode": "import torch; import fastode",
    "import fastode.flows": "import torch; import fastode, fastode.flows",
}

PROBE = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
{rest}
t2 = time.perf_counter()
print({{"torch_s": t1 - t0, "total_s": t2 - t0, "dynamo": "torch._dynamo" in sys.modules,
       "triton": "triton" in sys.modules}})
"""


def _one(stmt: str) -> dict:
    rest = stmt.replace("import torch; ", "", 1) if stmt != "import torch" else "pass"
    out = subprocess.run([sys.executable, "-c", PROBE.format(rest=rest)], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 (our own dict literal)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    from common import markdown_table, metadata, metadata_markdown, write_json, write_text

    meta = metadata()
    samples = {k: [] for k in STATEMENTS}
    for _ in range(args.repeats):
        for name, stmt in STATEMENTS.items():
            try:
                samples[name].append(_one(stmt))
            except subprocess.CalledProcessError:
                samples[name] = None  # not installed
    rows = []
    for name, runs in samples.items():
        if not runs:
            rows.append({"statement": name, "total (s)": "not installed"})
            continue
        total = statistics.median(r["total_s"] for r in runs)
        torch_s = statistics.median(r["torch_s"] for r in runs)
        rows.append({"statement": name, "total (s)": round(total, 3), "of which torch (s)": round(torch_s, 3),
                     "on top of torch (s)": round(total - torch_s, 3), "imports torch._dynamo": runs[0]["dynamo"],
                     "imports triton": runs[0]["triton"]})
    meta["loadavg_end"] = __import__("common").loadavg()
    write_json(args.out / "import_time.json", {"meta": meta, "repeats": args.repeats, "rows": rows})
    text = ["# Import time (`bench/bench_import.py`)", "", metadata_markdown(meta), "",
            f"Fresh interpreter per run, medians of {args.repeats} interleaved runs.", "",
            markdown_table(rows, list(rows[-1])), ""]
    write_text(args.out / "import_time.md", "\n".join(text))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
