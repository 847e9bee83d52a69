"""Smoke test of the benchmark harness (bench/): structure of the outputs only, never speed.

Runs ``python bench/run.py --smoke`` (seconds: one analytic problem, two tolerances, tiny neural ODE)
in a subprocess, so that its thread pinning does not leak into the other tests.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402


def test_run_smoke_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--no-progress", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("work_precision.json", "work_precision.md", "work_precision_linear.png",
                 "gradient_modes.json", "gradient_modes.md", "SUMMARY.md"):
        assert (tmp_path / name).stat().st_size > 0, name

    wp = json.loads((tmp_path / "work_precision.json").read_text())
    for key in ("git_commit", "machine", "versions", "loadavg_1_5_15", "loadavg_end", "threads"):
        assert key in wp["meta"]
    assert wp["meta"]["threads"]["torch.get_num_threads"] == 1
    for lib in ("python", "torch", "fastode", "torchdiffeq", "torchode", "scipy"):
        assert lib in wp["meta"]["versions"]
    assert wp["references"]["linear"]["reference_error"] < 1e-10
    libs = {r["library"] for r in wp["records"]}
    assert {"torchdiffeq", "torchode", "scipy"} <= libs
    assert "fastode" in libs or any(k.startswith("fastode") for k in wp["skipped"])
    for r in wp["records"]:
        assert set(r) >= {"problem", "library", "method", "rtol", "error", "nfe", "time_s", "failure"}
        if r["failure"] is None:
            assert r["nfe"] > 0 and r["time_s"] > 0 and r["error"] >= 0

    gm = json.loads((tmp_path / "gradient_modes.json").read_text())
    ok = [r for r in gm["rows"] if not r.get("failure")]
    assert ok
    for r in ok:
        assert set(r) >= {"config", "library", "mode", "time_s", "peak_rss_bytes", "saved_peak_bytes",
                          "nfe_fwd", "nfe_bwd", "grad_rel_diff"}
        assert r["nfe_fwd"] > 0
    first = ok[0]  # measured in a subprocess (bench/gradient_modes.py --worker)
    assert first["peak_rss_bytes"] >= 0 and first["nfe_bwd"] >= 0 and "memory_failure" not in first
    assert "| config | peer |" in (tmp_path / "gradient_modes.md").read_text()
    assert "git commit" in (tmp_path / "SUMMARY.md").read_text()


def test_harness_helpers():
    calls = []
    t = common.time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotated order
    assert all(len(x.samples) == 3 and x.median >= 0 for x in t.values())
    table = common.markdown_table([{"x": 1, "y": 2.5e-7}], {"x": "X", "y": "Y"})
    assert table.splitlines()[0] == "| X | Y |" and "2.50e-07" in table

    torch = pytest.importorskip("torch")
    w = torch.randn(64, 64, requires_grad=True)
    meter = common.SavedTensorMeter()
    with meter:
        y = torch.tanh(torch.randn(128, 64) @ w)  # saves the input (32 KiB), w, and tanh's output
        y.sum().backward()
    assert meter.peak_bytes >= 128 * 64 * 4 and meter.current == 0


def test_papers_quick_writes_every_verdict(tmp_path):
    """``bench/papers/run.py --quick``: every paper's experiments run end to end and the report holds, for each,
    the paper's number, fastode's measurement and a verdict (structure only: the quick scale decides nothing)."""
    proc = subprocess.run([sys.executable, str(BENCH / "papers" / "run.py"), "--quick", "--no-progress", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "papers-quick.json").read_text())
    papers = {v["paper"] for v in report["verdicts"]}
    assert len(papers) == 5, papers
    for v in report["verdicts"]:
        assert v["verdict"] in ("reproduced", "partly", "not reproduced")
        assert v["paper_value"] and v["measured"] and v["why"]
    assert set(report["wall_s"]) == {"onken", "rnode", "taynode", "toflow", "pal"}
    assert report["meta"]["git_commit"] and report["meta"]["seeds"]
    for name in report["plots"]:
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "papers-quick.md").read_text()
    assert "## Summary" in md and "| paper | experiment | paper reports | fastode measured | verdict |" in md
    # the shared baseline arms trained once and every arm recorded its forward NFE per iteration
    runs = report["runs"]
    assert "toy none" in runs and all(0 < len(r["nfe"]) <= r["iters"] for r in runs.values())


def test_roofline_smoke_reports_fractions_of_a_measured_peak(tmp_path):
    """bench_roofline.py compiles the FMA / bandwidth probe, measures the floor and rates one network's fused paths
    against it (structure only: positive rates, fractions in (0, 1.5])."""
    import fastode.cpp as fc

    if not fc.available():
        pytest.skip("the C++ extension is not built")
    proc = subprocess.run([sys.executable, str(BENCH / "bench_roofline.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "roofline_cpu.json").read_text())
    assert doc["peak"]["fma_flops"] > 1e9 and doc["peak"]["l2_read_bytes_per_s"] > 1e9
    paths = {r["path"] for r in doc["rows"]}
    assert {"forward", "hutchinson", "exact", "hutchinson_backward"} <= paths
    for r in doc["rows"]:
        assert r["gflops"] > 0 and 0 < r["peak_fraction"] <= 1.5 and r["intensity_flop_per_byte"] > 0
    assert "of FMA peak" in (tmp_path / "roofline_cpu.md").read_text()


def test_bench_compiled_states_each_problem_once_for_every_peer():
    """bench_compiled.py writes each small ODE once over an array namespace; the torch and NumPy right-hand
    sides (fastode / torchdiffeq / torchode vs scipy) must agree, and the orbit must conserve energy."""
    import numpy as np
    import torch

    import bench_compiled as bc

    rng = np.random.default_rng(0)
    for name, (y0, t1, mat) in bc.SMALL.items():
        y = np.asarray(y0) + 0.1 * rng.standard_normal(len(y0))
        f_np = bc._rhs(name, np, mat)(0.3, y)
        f_t = bc._rhs(name, torch, None if mat is None else torch.tensor(mat))(torch.tensor(0.3), torch.tensor(y))
        assert np.allclose(f_np, f_t.numpy(), rtol=1e-12, atol=1e-12), name
    from scipy.integrate import solve_ivp
    y0, t1, _ = bc.SMALL["kepler_orbit"]
    sol = solve_ivp(bc._rhs("kepler_orbit", np, None), (0, t1), y0, rtol=1e-10, atol=1e-10)
    energy = lambda y: 0.5 * (y[2] ** 2 + y[3] ** 2) - 1 / np.hypot(y[0], y[1])  # noqa: E731
    assert abs(energy(sol.y[:, -1]) - energy(np.asarray(y0))) < 1e-7
    assert np.allclose(sol.y[:, -1], y0, atol=1e-6)   # one full period
