"""Compile-only check: build every fastode Triton kernel for a GPU target without a GPU, record registers/spills.

    python -m fastode.kernels.compile_only [--arch 90] [--out bench/results/kernels_sm90_registers.json] [--quick]

Uses ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and the ``ptxas`` bundled with
the Triton wheel, so it runs on a CPU-only machine. This catches what the interpreter lets through
(``tl.dot`` with K < 16, ``break``/``return`` in loops, non-jit calls, ...) and reports per kernel:
registers, spill stores/loads (bytes, from ``ptxas -v``), shared memory, whether FP32 dots stayed exact
(no TF32 ``mma``), and the compile time.

Must run in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces ``@triton.jit``);
the test suite therefore runs this module in a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("fastode.kernels.compile_only needs TRITON_INTERPRET unset (run it in a fresh process)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import cnf_solve as CSV  # noqa: E402
from . import cnf_step as STEP  # noqa: E402
from . import concatsquash as CS  # noqa: E402
from . import rk as RK  # noqa: E402
from ._common import ACT_CODES, DOT_PRECISION  # noqa: E402

_TY = {"float32": "fp32", "float64": "fp64"}


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers / spills / stack from ``ptxas -v`` on the kernel's PTX (same flags Triton uses)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([_ptxas_path(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(d, "k.o")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}): {res.stderr[-2000:]}")
    log = res.stderr + res.stdout
    out = {}
    m = re.search(r"Used (\d+) registers", log)
    out["registers"] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    out["spill_store_bytes"], out["spill_load_bytes"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    m = re.search(r"(\d+) bytes stack frame", log)
    out["stack_bytes"] = int(m.group(1)) if m else None
    return out


def _signature(kernel, types: dict, constexprs: dict):
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        ty = types[name]
        sig[name] = ty
        if isinstance(ty, tuple):
            for j, t in enumerate(ty):
                if t.startswith("*"):
                    attrs[(i, j)] = [["tt.divisibility", 16]]
        elif ty.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(kernel, types: dict, constexprs: dict, arch: int = 90, num_warps: int = 4) -> dict:
    sig, attrs = _signature(kernel, types, constexprs)
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps})
    dt = time.perf_counter() - t0
    ptx = k.asm["ptx"]
    rec = {"kernel": kernel.__name__, "num_warps": num_warps, "compile_s": round(dt, 2),
           "shared_bytes": k.metadata.shared, "mma": "mma.sync" in ptx or "wgmma" in ptx,
           "tf32": ".tf32" in ptx}
    rec.update(_ptxas_stats(ptx, arch))
    return rec


def _csq_tiles(dtype: str, D: int, width: int, BM, CH):
    cfg = CS.default_config(D, [width], getattr(torch, dtype))
    CH = CH or cfg["CH"]
    BM = BM or cfg["BM"]
    CD = min(cfg["CD"], CH)
    P = max(16, -(-width // CH) * CH, -(-D // CD) * CD)
    return BM, CH, CD, P


def _csq_fwd(dtype: str, mode: int, L: int, D: int, width: int, BM, act="tanh", CH=None, num_warps=4, arch=90):
    BM, CH, CD, P = _csq_tiles(dtype, D, width, BM, CH)
    p = "*" + _TY[dtype]
    types = {n: p for n in ("t_ptr", "z_ptr", "e_ptr", "w_ptr", "v_ptr", "f_ptr", "vjp_ptr", "tr_ptr", "kin_ptr",
                            "frob_ptr", "scr_ptr")}
    types.update(dims_ptr="*i32", B="i32", D="i32", n_tiles="i32")
    cx = dict(L=L, P=P, ACT=ACT_CODES[act], MODE=mode, BM=BM, CH=CH, CD=CD, PREC=DOT_PRECISION)
    rec = compile_one(CS.csq_fwd_kernel, types, cx, arch, num_warps)
    rec["config"] = dict(dtype=dtype, mode=mode, L=L, D=D, hidden=width, BM=BM, CH=CH, CD=CD, P=P, act=act)
    return rec


def _csq_bwd(dtype: str, mode: int, L: int, D: int, width: int, BM, act="tanh", CH=None, num_warps=4, arch=90):
    BM, CH, CD, P = _csq_tiles(dtype, D, width, BM, CH)
    p = "*" + _TY[dtype]
    types = {n: p for n in ("t_ptr", "z_ptr", "e_ptr", "w_ptr", "v_ptr", "gf_ptr", "gv_ptr", "gtr_ptr", "gkin_ptr",
                            "gfrob_ptr", "gz_ptr", "ge_ptr", "dw_ptr", "dv_ptr", "scr_ptr")}
    types.update(dims_ptr="*i32", B="i32", D="i32", n_tiles="i32")
    hut = mode == CS.MODE_HUTCH
    cx = dict(L=L, P=P, ACT=ACT_CODES[act], MODE=mode, BM=BM, CH=CH, CD=CD, PREC=DOT_PRECISION, HAS_GF=True,
              HAS_GV=hut, HAS_GTR=mode != CS.MODE_F, HAS_GKIN=True, HAS_GFROB=hut, NEED_GE=hut,
              SECOND=mode != CS.MODE_F)
    rec = compile_one(CS.csq_bwd_kernel, types, cx, arch, num_warps)
    rec["config"] = dict(dtype=dtype, mode=mode, L=L, D=D, hidden=width, BM=BM, CH=CH, CD=CD, P=P, act=act)
    return rec


def _tableau_rows():
    """(name, stage rows, b, b_err) of dopri5 from fastode.tableaus, or a synthetic 7-stage stand-in."""
    try:
        from fastode.tableaus import get_tableau  # type: ignore

        tab = get_tableau("dopri5")
        return "dopri5", [tuple(r) for r in tab.a], tuple(tab.b), tuple(tab.b_err)
    except Exception:  # tableaus not available: structure-only stand-in (compile checks need no true values)
        s = 7
        rows = [tuple(1.0 / (i + j + 2) for j in range(i)) for i in range(s)]
        return "synthetic7", rows, tuple(1.0 / (j + 2) for j in range(s)), tuple(1.0 / (j + 3) for j in range(s))


def _rk_records(dtype: str, arch: int):
    p = "*" + _TY[dtype]
    name, rows, b, b_err = _tableau_rows()
    recs = []
    row = max(rows, key=lambda r: sum(1 for c in r if c != 0.0))
    coefs = tuple(c for c in row if c != 0.0)
    n = len(coefs)
    types = dict(y_ptr=p, ks=(p,) * n, dt_ptr=p, out_ptr=p, N="i32")
    rec = compile_one(RK.rk_stage_kernel, types, dict(COEFS=coefs, HAS_Y=True, BLOCK=RK._STAGE_BLOCK), arch)
    rec["config"] = dict(dtype=dtype, tableau=name, stages=n)
    recs.append(rec)
    types = dict(g_ptr=p, ks=(p,) * n, dt_ptr=p, gks=(p,) * n, part_ptr=p, N="i32")
    rec = compile_one(RK.rk_stage_bwd_kernel, types, dict(COEFS=coefs, NEED_DT=True, BLOCK=RK._STAGE_BLOCK), arch)
    rec["config"] = dict(dtype=dtype, tableau=name, stages=n)
    recs.append(rec)
    idx, _, bc, ec = RK._active(list(range(len(b))), b, b_err)
    m = len(idx)
    BR, BC = RK._epi_blocks(64, getattr(torch, dtype))
    types = dict(y0_ptr=p, ks=(p,) * m, dt_ptr=p, atol_ptr=p, rtol_ptr=p, y1_ptr=p, err_ptr=p, psq_ptr=p,
                 pmax_ptr=p, rms_s_ptr=p, max_s_ptr=p, rms_b_ptr=p, max_b_ptr=p, cnt_ptr="*i32", B="i32", M="i32",
                 split_w="i32")
    cx = dict(BCOEF=bc, ECOEF=ec, ATOL_T=False, RTOL_T=True, HAS_ERR=True, PRECOMP=False, BR=BR, BC=BC, RB=256)
    rec = compile_one(RK.rk_epilogue_kernel, types, cx, arch)
    rec["config"] = dict(dtype=dtype, tableau=name, stages=m, BR=BR, BC=BC)
    recs.append(rec)
    types2 = dict(types, ks=(p, p))
    cx = dict(BCOEF=(0.0, 0.0), ECOEF=(0.0, 0.0), ATOL_T=True, RTOL_T=False, HAS_ERR=True, PRECOMP=True, BR=BR, BC=BC,
              RB=256)
    rec = compile_one(RK.rk_epilogue_kernel, types2, cx, arch)
    rec["config"] = dict(dtype=dtype, variant="error_ratio only", BR=BR, BC=BC)
    recs.append(rec)
    types = dict(y0_ptr=p, ks=(p,) * m, dt_ptr=p, atol_ptr=p, rtol_ptr=p, g1_ptr=p, ge_ptr=p, grb_ptr=p,
                 grs_ptr=p, rms_b_ptr=p, rms_s_ptr=p, gy0_ptr=p, gks=(p,) * m, part_ptr=p, B="i32", M="i32",
                 split_w="i32")
    cx = dict(BCOEF=bc, ECOEF=ec, ATOL_T=False, RTOL_T=True, HAS_G1=True, HAS_GE=True, HAS_GRB=True, HAS_GRS=True,
              NEED_DT=True, PRECOMP=False, BR=BR, BC=BC)
    rec = compile_one(RK.rk_epilogue_bwd_kernel, types, cx, arch)
    rec["config"] = dict(dtype=dtype, tableau=name, stages=m, BR=BR, BC=BC)
    recs.append(rec)
    return recs


def _cnf_types(dtype: str, state: tuple, fp64: tuple, ints: tuple) -> dict:
    """Argument types of a fused CNF kernel: state-dtype pointers, float64 pointers, ``dims_ptr`` and int32 scalars."""
    p = "*" + _TY[dtype]
    types = {n: p for n in state}
    types.update({n: "*fp64" for n in fp64})
    types.update({n: "i32" for n in ints}, dims_ptr="*i32")
    return types


def _cnf_common(dtype: str, method: str, mode: int, rates: tuple, L: int, D: int, width: int, BM, act: str):
    """``(spec, rate codes, constexprs shared by the fused CNF kernels, config record)`` of one configuration."""
    from fastode.tableaus import get_tableau  # type: ignore

    tab = get_tableau(method)  # an embedded error estimate: the adaptive step kernel
    spec = CSV.StepSpec.of(tab, tab.b_err is not None)
    BM, CH, CD, P = _csq_tiles(dtype, D, width, BM, None)
    codes = tuple(CSV.RATE_CODES[r] for r in rates)
    cx = dict(L=L, P=P, ACT=ACT_CODES[act], MODE=mode, BM=BM, CH=CH, CD=CD, PREC=DOT_PRECISION, RATES=codes or (0,),
              NQ=len(codes), TIME_F32=dtype == "float32")
    config = dict(dtype=dtype, method=method, mode=mode, rates=list(rates), L=L, D=D, hidden=width, BM=BM, CH=CH,
                  CD=CD, P=P, act=act)
    return spec, codes, cx, config


_STATE = ("z_ptr", "q_ptr", "f_ptr", "fq_ptr", "mid_ptr", "midq_ptr", "e_ptr", "w_ptr", "v_ptr", "scr_ptr")


def _cnf_step(dtype: str, method: str, mode: int, rates: tuple, L: int, D: int, width: int, BM, act="tanh",
              tape=False, num_warps=4, arch=90):
    """The fused CNF step kernel for ``method``'s tableau (adaptive methods with the device controller)."""
    spec, codes, cx, config = _cnf_common(dtype, method, mode, rates, L, D, width, BM, act)
    types = _cnf_types(dtype, _STATE + ("tape_ptr",), ("ctl", "opt", "part_ptr", "steps_t", "steps_dt", "steps_h",
                                                     "grid_ptr"), ("cap", "step_i", "B", "D", "n_tiles"))
    types["cnt_ptr"] = "*i32"
    cx.update(NQN=min(1, len(codes)), TAPE=tape, **spec.constexprs())
    rec = compile_one(STEP.cnf_step_kernel, types, cx, arch, num_warps)
    rec["config"] = dict(config, tape=tape)
    return rec


def _cnf_tile_solve(dtype: str, method: str, mode: int, rates: tuple, L: int, D: int, width: int, BM, act="tanh",
                    num_warps=4, arch=90):
    """The per-tile adaptive solve kernel (one launch per solve) for ``method``'s tableau, with its tape."""
    spec, codes, cx, config = _cnf_common(dtype, method, mode, rates, L, D, width, BM, act)
    types = _cnf_types(dtype, _STATE + ("tape_ptr",), ("ctl_ptr", "opt", "steps_t", "steps_dt", "steps_h"),
                       ("cap", "B", "D", "n_tiles"))
    cx.update(S=spec.S, C=spec.C, A=spec.A, BW=spec.BW, EW=spec.EW, CM=spec.CM, NQN=min(1, len(codes)),
              ORDER=spec.ORDER, FIRST_GIVEN=False, TAPE=True)
    rec = compile_one(STEP.cnf_tile_solve_kernel, types, cx, arch, num_warps)
    rec["config"] = config
    return rec


def _cnf_bwd_cx(codes, cx: dict, S: int) -> dict:
    return dict(cx, S=S, HAS_TR=any(c in (0, 1) for c in codes), HAS_KIN=2 in codes, HAS_FR=3 in codes)


def _cnf_step_bwd(dtype: str, method: str, mode: int, rates: tuple, L: int, D: int, width: int, BM, act="tanh",
                  seeded=False, num_warps=4, arch=90):
    """The fused discrete adjoint of one CNF step (batch-global / grid solves) for ``method``'s tableau."""
    spec, codes, cx, config = _cnf_common(dtype, method, mode, rates, L, D, width, BM, act)
    types = _cnf_types(dtype, ("ztape_ptr", "e_ptr", "w_ptr", "v_ptr", "gz1_ptr", "gq1_ptr", "sk_ptr", "skq_ptr",
                               "gzx_ptr", "gz0_ptr", "dw_ptr", "dv_ptr", "scr_ptr"), ("tab_ptr", "t0s", "dts"),
                       ("step_i", "B", "D", "n_tiles"))
    types["needs_ptr"] = "*i32"
    cx = dict(_cnf_bwd_cx(codes, cx, spec.S), HAS_SEED=seeded)
    rec = compile_one(STEP.cnf_step_bwd_kernel, types, cx, arch, num_warps)
    rec["config"] = dict(config, seeded=seeded)
    return rec


def _cnf_tile_bwd(dtype: str, method: str, mode: int, rates: tuple, L: int, D: int, width: int, BM, act="tanh",
                  num_warps=4, arch=90):
    """The per-tile backward (every tile's steps in reverse, one launch) for ``method``'s tableau."""
    spec, codes, cx, config = _cnf_common(dtype, method, mode, rates, L, D, width, BM, act)
    types = _cnf_types(dtype, ("ztape_ptr", "e_ptr", "w_ptr", "v_ptr", "gb_ptr", "qb_ptr", "sk_ptr", "skq_ptr",
                               "gzx_ptr", "dw_ptr", "dv_ptr", "scr_ptr"), ("tab_ptr", "ctl_ptr", "steps_t", "steps_h"),
                       ("cap", "B", "D", "n_tiles"))
    types["needs_ptr"] = "*i32"
    rec = compile_one(STEP.cnf_tile_bwd_kernel, types, _cnf_bwd_cx(codes, cx, spec.S), arch, num_warps)
    rec["config"] = config
    return rec


def _cnf_prepare(dtype: str, arch=90):
    types = dict(ctl="*fp64", opt="*fp64", like_ptr="*" + _TY[dtype])
    rec = compile_one(STEP.cnf_prepare_kernel, types, dict(TIME_F32=dtype == "float32"), arch, 1)
    rec["config"] = dict(dtype=dtype)
    return rec


def compile_all(arch: int = 90, quick: bool = False, log=None) -> list[dict]:
    """Compile every kernel in representative configurations; returns one record per compiled kernel."""
    recs = []

    def add(fn, *a, **kw):
        rec = fn(*a, arch=arch, **kw)
        recs.append(rec)
        if log:
            log(rec)

    dtypes = ("float32",) if quick else ("float32", "float64")
    for dtype in dtypes:
        # the FFJORD toy model: 2 -> 64 -> 64 -> 64 -> 2, tanh
        for mode in (CS.MODE_F, CS.MODE_HUTCH, CS.MODE_EXACT):
            add(_csq_fwd, dtype, mode, 4, 2, 64, None)
            if not quick or mode == CS.MODE_HUTCH:
                add(_csq_bwd, dtype, mode, 4, 2, 64, None)
        for rec in _rk_records(dtype, arch):
            recs.append(rec)
            if log:
                log(rec)
    # the fused CNF step: every method the engines run, on the toy model with the RNODE integrands (quick: a small
    # model, bosh3 -- the full step of dopri5 on the toy model takes ~70 s to compile)
    if quick:
        add(_cnf_step, "float32", "bosh3", CS.MODE_HUTCH, ("trace", "kinetic"), 2, 2, 32, None)
        add(_cnf_step_bwd, "float32", "bosh3", CS.MODE_HUTCH, ("trace", "kinetic"), 2, 2, 32, None)
        add(_cnf_tile_solve, "float32", "bosh3", CS.MODE_HUTCH, ("trace", "kinetic"), 2, 2, 32, None)
        add(_cnf_tile_bwd, "float32", "bosh3", CS.MODE_HUTCH, ("trace", "kinetic"), 2, 2, 32, None)
    else:
        add(_cnf_step, "float32", "dopri5", CS.MODE_HUTCH, ("trace", "kinetic", "jac_frob"), 4, 2, 64, None)
        add(_cnf_step, "float32", "dopri5", CS.MODE_HUTCH, ("trace", "kinetic", "jac_frob"), 4, 2, 64, None,
            tape=True)
        add(_cnf_tile_solve, "float32", "dopri5", CS.MODE_HUTCH, ("trace", "kinetic", "jac_frob"), 4, 2, 64, None)
        add(_cnf_tile_bwd, "float32", "dopri5", CS.MODE_HUTCH, ("trace", "kinetic", "jac_frob"), 4, 2, 64, None)
        for seeded in (False, True):
            add(_cnf_step_bwd, "float32", "dopri5", CS.MODE_HUTCH, ("trace", "kinetic", "jac_frob"), 4, 2, 64, None,
                seeded=seeded)
        add(_cnf_step_bwd, "float32", "rk4", CS.MODE_HUTCH, ("trace",), 4, 2, 64, None)
    add(_cnf_prepare, "float32")
    if not quick:
        for method in ("tsit5", "bosh3", "rk4", "rk4_classic"):
            add(_cnf_step, "float32", method, CS.MODE_HUTCH, ("trace",), 4, 2, 64, None)
        add(_cnf_step, "float32", "dopri5", CS.MODE_EXACT, ("trace",), 4, 2, 64, None)
        add(_cnf_step, "float64", "dopri5", CS.MODE_HUTCH, ("trace", "kinetic", "jac_frob"), 4, 2, 64, None)
        add(_cnf_prepare, "float64")
    if not quick:
        # wide (256) and deep (6 layers), other activations, a larger tile
        add(_csq_fwd, "float32", CS.MODE_HUTCH, 3, 16, 256, 32, act="softplus")
        add(_csq_bwd, "float32", CS.MODE_HUTCH, 3, 16, 256, 32, act="softplus")
        add(_csq_fwd, "float32", CS.MODE_HUTCH, 6, 5, 64, 32, act="swish")
        add(_csq_bwd, "float32", CS.MODE_HUTCH, 6, 5, 64, 32, act="elu")
        add(_csq_fwd, "float32", CS.MODE_HUTCH, 4, 2, 64, 64, CH=64)
        add(_csq_bwd, "float32", CS.MODE_HUTCH, 4, 2, 64, 64, CH=64)
    return recs


def _markdown(meta: dict, recs: list) -> str:
    """The records as a table: one row per compiled configuration, spilling ones marked."""
    lines = [f"# Registers and spills per kernel, {meta['target']} (compiled without a GPU)", "",
             f"`{meta['generated_by']}`; Triton {meta['triton']}; {meta['note']}.", "",
             "| kernel | configuration | registers | spill stores / loads (B) | shared (B) | compile (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in recs:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        spill = f"{r['spill_store_bytes']} / {r['spill_load_bytes']}"
        if r["spill_store_bytes"]:
            spill = f"**{spill}**"
        lines.append(f"| {r['kernel']} | {cfg} | {r['registers']} | {spill} | {r['shared_bytes']} | {r['compile_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", default=None, help="write the records as JSON here")
    ap.add_argument("--quick", action="store_true", help="float32 toy configurations only")
    args = ap.parse_args(argv)

    def log(rec):
        print(f"{rec['kernel']:24s} regs={rec['registers']!s:>4} spill_st={rec['spill_store_bytes']!s:>6} "
              f"spill_ld={rec['spill_load_bytes']!s:>6} smem={rec['shared_bytes']:>6} mma={rec['mma']!s:5} "
              f"tf32={rec['tf32']!s:5} {rec['compile_s']:6.2f}s {rec['config']}", flush=True)

    recs = compile_all(args.arch, args.quick, log)
    if args.out:
        meta = {"target": f"cuda sm_{args.arch}", "triton": triton.__version__, "python": platform.python_version(),
                "machine": platform.machine(), "generated_by": "python -m fastode.kernels.compile_only",
                "note": "compiled without a GPU (ptxas from the Triton wheel); registers per thread, spills in bytes"}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "kernels": recs}, fh, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
            fh.write(_markdown(meta, recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
