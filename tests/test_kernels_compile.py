"""Compile-only tier: every Triton kernel builds for sm_90 on this GPU-less machine (ptxas from the Triton
wheel); records registers/spills and checks that float32 dots stay exact (FMA, no TF32 mma).

Runs ``python -m fastode.kernels.compile_only --quick`` in a subprocess because the interpreter (set for
this pytest session on CPU-only machines, see conftest.py) replaces ``@triton.jit``. The full table is
``bench/results/kernels_sm90_registers.json`` (``python -m fastode.kernels.compile_only --out ...``).
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.compile_only

triton = pytest.importorskip("triton")

KERNELS = {"csq_fwd_kernel", "csq_bwd_kernel", "rk_stage_kernel", "rk_stage_bwd_kernel", "rk_epilogue_kernel",
           "rk_epilogue_bwd_kernel", "cnf_step_kernel", "cnf_prepare_kernel",
           "cnf_step_bwd_kernel", "cnf_tile_solve_kernel", "cnf_tile_bwd_kernel"}


def test_every_kernel_compiles_for_sm90(tmp_path):
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90).path
    except Exception as exc:  # pragma: no cover - wheel without the NVIDIA backend
        pytest.skip(f"no ptxas in this Triton install: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "regs.json"
    res = subprocess.run([sys.executable, "-m", "fastode.kernels.compile_only", "--quick", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = json.loads(out.read_text())["kernels"]
    assert {r["kernel"] for r in recs} >= KERNELS
    for r in recs:
        assert r["registers"] is not None and r["registers"] <= 255, r
        assert not r["tf32"], f"TF32 instructions in {r['kernel']} {r['config']}"
        if r["config"]["dtype"] == "float32" and r["kernel"].startswith(("csq", "cnf_step")):
            # input_precision="ieee": exact FP32 FMA dots, not tensor-core (TF32) mma
            assert not r["mma"], f"{r['kernel']} {r['config']} uses mma for float32 dots"
        # default tiles stay (nearly) spill-free: a few dozen bytes at most
        assert (r["spill_store_bytes"] or 0) <= 256, r
