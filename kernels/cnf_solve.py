"""Launchers of the fused CNF step kernels (:mod:`fastode.kernels.cnf_step`): one call, one launch.

:class:`CnfLauncher` holds one CNF configuration (a packed concatsquash MLP, its activation, the trace mode, the ``q``
rates, a tableau as constexprs) and launches its kernels: :meth:`~CnfLauncher.evaluate` (the rates at one time, the
MLP kernels), :meth:`~CnfLauncher.step` (one fused step or step attempt), :meth:`~CnfLauncher.prepare` (the first
attempt's step size on the device), :meth:`~CnfLauncher.tile_solve` (a whole per-tile solve), and the backward
launches :meth:`~CnfLauncher.step_backward` / :meth:`~CnfLauncher.tile_backward`. It also builds the kernels' blocks
(:func:`options`, :func:`control_blocks`) and sums the programs' parameter partials (:meth:`~CnfLauncher.param_grads`).

Launchers own shapes, buffers, the grid and the constexprs; the kernels know pointers, shapes and tableau constants.
The solve driver that sequences these launches (first step, the attempt loop, the tape, the interpolation at the end
time and its adjoint) is a solver, not a launcher: :mod:`fastode.flows.fused.triton`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton

from fastode.codes import RATE_CODES
from fastode.launch_count import launched

from . import cnf_step as K
from . import concatsquash as CS
from ._common import ACT_CODES, DOT_PRECISION, empty, max_programs

TRACE_MODES = {"none": CS.MODE_F, "hutchinson": CS.MODE_HUTCH, "exact": CS.MODE_EXACT}

@dataclass(frozen=True)
class StepSpec:
    """A tableau as the step kernel's constants (all Python floats from :mod:`fastode.tableaus`)."""

    S: int
    C: tuple
    A: tuple          # row-major s x s
    BW: tuple
    EW: tuple
    CM: tuple
    FSAL: bool
    ORDER: int
    ADAPTIVE: bool

    @classmethod
    def of(cls, tab, adaptive: bool) -> "StepSpec":
        s = len(tab.c)
        a = [0.0] * (s * s)
        for i, row in enumerate(tab.a):
            for j, v in enumerate(row):
                a[i * s + j] = float(v)
        zeros = (0.0,) * s
        if adaptive:
            if tab.b_err is None or tab.c_mid is None or not tab.fsal:
                raise ValueError(f"tableau {tab.name!r}: the fused adaptive step needs an FSAL tableau with an error "
                                 "estimate and midpoint weights (dopri5, tsit5, bosh3)")
            ew, cm = tuple(float(v) for v in tab.b_err), tuple(float(v) for v in tab.c_mid)
        else:
            ew = cm = zeros
        return cls(s, tuple(float(v) for v in tab.c), tuple(a), tuple(float(v) for v in tab.b), ew, cm,
                   bool(tab.fsal and adaptive), int(tab.order), bool(adaptive))

    def constexprs(self) -> dict:
        return dict(S=self.S, C=self.C, A=self.A, BW=self.BW, EW=self.EW, CM=self.CM, FSAL=self.FSAL,
                    ADAPTIVE=self.ADAPTIVE, ORDER=self.ORDER)


def _scratch_per_program(L: int, S: int, NQ: int, BM: int, P: int) -> int:
    return (2 * L + 2 + S) * BM * P + S * NQ * BM


class CnfLauncher:
    """The fused kernels of one CNF configuration: a packed concatsquash MLP (:class:`~fastode.kernels.concatsquash.
    PackedParams`), its activation, the trace mode (``"hutchinson"``, ``"exact"``, ``"none"``), the ``q`` rates
    (names of :data:`RATE_CODES`), how many ``q`` columns steer the step (``nq_norm``) and a tableau."""

    def __init__(self, packed: CS.PackedParams, activation: str, trace: str, rates: Sequence[str], nq_norm: int,
                 tableau, *, adaptive: bool, BM: Optional[int] = None, max_programs: Optional[int] = None,
                 num_warps: int = 4):
        self.packed = packed
        self.activation = activation
        self.mode = TRACE_MODES[trace]
        self.rates = tuple(RATE_CODES[r] for r in rates)
        self.nq = len(self.rates)
        self.nq_norm = min(int(nq_norm), self.nq)
        self.spec = StepSpec.of(tableau, adaptive)
        dtype = packed.W.dtype
        cfg = CS.default_config(packed.D, packed.widths, dtype)
        self.BM = BM or cfg["BM"]
        self.max_programs = max_programs
        self.num_warps = num_warps
        self._tables: dict = {}

    # -------------------------------------------------------------------------------------------- set-up
    def programs(self, B: int, device) -> tuple:
        """``(tiles, programs)`` of a launch over ``B`` rows."""
        n_tiles = triton.cdiv(B, self.BM)
        cap = max_programs(device) if self.max_programs is None else self.max_programs
        return n_tiles, max(1, min(n_tiles, cap))

    def buffers(self, z0, q0, slots: int = 2):
        """The step kernels' state buffers ``(Z, Q, F, FQ, MID, MIDQ)``, slot 0 holding ``(z0, q0)``."""
        B, D = z0.shape
        nqb = max(self.nq, 1)
        Z = empty((slots, B, D), z0)
        F, MID = (empty((2, B, D), z0) for _ in range(2))
        Q = empty((slots, B, nqb), z0)
        FQ, MIDQ = (empty((2, B, nqb), z0) for _ in range(2))
        Z[0] = z0
        if self.nq:
            Q[0] = q0
        return Z, Q, F, FQ, MID, MIDQ

    def scratch(self, nprog, like):
        pk = self.packed
        return empty((nprog * _scratch_per_program(pk.L, self.spec.S, self.nq, self.BM, pk.P),), like)

    # -------------------------------------------------------------------------------------------- forward
    def evaluate(self, t: torch.Tensor, z: torch.Tensor, e: Optional[torch.Tensor]):
        """The rates at ``(t, z)`` (``t`` a 0-dim device tensor of z's dtype): ``(f (B, D), q rates (B, NQ))``."""
        f, _, tr, kin, fr = CS.concatsquash_fwd(t, z, e, self.packed, self.activation, self.mode, BM=self.BM,
                                                max_progs=self.max_programs, num_warps=self.num_warps)
        cols = {0: (lambda: -tr), 1: (lambda: tr), 2: (lambda: kin), 3: (lambda: fr)}
        q = torch.stack([cols[c]() for c in self.rates], -1) if self.nq else z.new_zeros(z.shape[0], 0)
        return f, q

    def step(self, bufs, e, ctl, opt, part, cnt, steps, cap, grid, step_i, tape, scr, B, D, n_tiles, nprog,
             time_f32):
        """One fused step (fixed grid: interval ``step_i`` of ``grid``) or step attempt (adaptive: the control
        block ``ctl``); ``tape``: a buffer for each accepted step's start, or None."""
        Z, Q, F, FQ, MID, MIDQ = bufs
        pk = self.packed
        launched("cnf_step_kernel")
        K.cnf_step_kernel[(nprog,)](
            Z, Q, F, FQ, MID, MIDQ, e, pk.W, pk.V, pk.dims, ctl, opt, part, cnt, steps[0], steps[1], steps[2], cap,
            grid, step_i, tape if tape is not None else Z, scr, B, D, n_tiles,
            L=pk.L, P=pk.P, ACT=ACT_CODES[self.activation], MODE=self.mode, BM=self.BM, CH=pk.CH, CD=pk.CD,
            PREC=DOT_PRECISION, RATES=self.rates or (0,), NQ=self.nq, NQN=self.nq_norm, TIME_F32=time_f32,
            TAPE=tape is not None, num_warps=self.num_warps, **self.spec.constexprs())

    def prepare(self, ctl, opt, z0, time_f32: bool):
        """The first attempt's clamped step on the device (one program)."""
        launched("cnf_prepare_kernel")
        K.cnf_prepare_kernel[(1,)](ctl, opt, z0, TIME_F32=time_f32)

    def tile_solve(self, bufs, e, ctl, opt, steps, cap, tape, B, D, n_tiles, nprog, time_f32, first_given):
        """A whole per-tile solve in one launch: every tile's attempts to its end time (``ctl``: one control block
        per tile; ``steps``: (3, tiles * cap) per-tile records; ``tape``: (cap, B, D) step starts, or None)."""
        Z, Q, F, FQ, MID, MIDQ = bufs
        pk, sp = self.packed, self.spec
        launched("cnf_tile_solve_kernel")
        K.cnf_tile_solve_kernel[(nprog,)](
            Z, Q, F, FQ, MID, MIDQ, e, pk.W, pk.V, pk.dims, ctl, opt, steps[0], steps[1], steps[2], cap,
            tape if tape is not None else Z, self.scratch(nprog, Z), B, D, n_tiles,
            L=pk.L, P=pk.P, ACT=ACT_CODES[self.activation], MODE=self.mode, BM=self.BM, CH=pk.CH, CD=pk.CD,
            PREC=DOT_PRECISION, S=sp.S, C=sp.C, A=sp.A, BW=sp.BW, EW=sp.EW, CM=sp.CM, RATES=self.rates or (0,),
            NQ=self.nq, NQN=self.nq_norm, ORDER=sp.ORDER, TIME_F32=time_f32, FIRST_GIVEN=first_given,
            TAPE=tape is not None, num_warps=self.num_warps)

    # -------------------------------------------------------------------------------------------- backward
    def _stage_needs(self) -> tuple:
        """``(NEED, KNEED)`` per stage of an unseeded step: a cotangent reaches it (a solution weight or a later needed
        stage), and its derivative enters a later needed stage's input."""
        sp = self.spec
        S = sp.S
        need = [False] * S
        for i in reversed(range(S)):
            need[i] = sp.BW[i] != 0.0 or any(sp.A[j * S + i] != 0.0 and need[j] for j in range(i + 1, S))
        kneed = [any(sp.A[j * S + i] != 0.0 and need[j] for j in range(i + 1, S)) for i in range(S)]
        return tuple(need), tuple(kneed)

    def _seeded_needs(self) -> tuple:
        """``(NEED, KNEED)`` of the last step, whose every stage enters the interpolant."""
        sp = self.spec
        return (True,) * sp.S, tuple(any(sp.A[j * sp.S + i] != 0.0 for j in range(i + 1, sp.S)) for i in range(sp.S))

    def _bwd_constexprs(self, time_f32: bool) -> dict:
        pk, sp = self.packed, self.spec
        return dict(L=pk.L, P=pk.P, ACT=ACT_CODES[self.activation], MODE=self.mode, BM=self.BM, CH=pk.CH, CD=pk.CD,
                    PREC=DOT_PRECISION, S=sp.S, RATES=self.rates or (0,), NQ=self.nq,
                    HAS_TR=any(c in (0, 1) for c in self.rates), HAS_KIN=2 in self.rates, HAS_FR=3 in self.rates,
                    TIME_F32=time_f32, num_warps=self.num_warps)

    def _bwd_tables(self, like: torch.Tensor, kind: str):
        """The backward kernels' tableau (float64 ``[c, a, b]``) and stage table (int32 ``[NEED_U, NEED_S,
        KNEED_S]``) for an unseeded step (``"plain"``), the seeded last step (``"seeded"``) or a per-tile solve
        (``"tiles"``: both kinds in one launch)."""
        key = (like.device, kind)
        hit = self._tables.get(key)
        if hit is None:
            sp = self.spec
            tab = torch.tensor(sp.C + sp.A + sp.BW, dtype=torch.float64, device=like.device)
            need, kneed = self._stage_needs()
            sneed, skneed = self._seeded_needs()
            rows = {"plain": (need, need, kneed), "seeded": (sneed, sneed, skneed), "tiles": (need, sneed, skneed)}
            needs = torch.tensor([int(v) for row in rows[kind] for v in row], dtype=torch.int32, device=like.device)
            hit = self._tables[key] = (tab, needs)
        return hit

    def step_backward(self, tape, e, t0s, dts, time_f32, n, gz1, gq1, seeds, dw, dv, scr, nprog):
        """One launch: the cotangent of step ``n``'s start (``tape[n]``, time ``t0s[n]``, step ``dts[n]``) from that
        of its end (``gz1`` (B, D), ``gq1`` (B, NQ)) and the seeds (None, or ``(sk (S, B, D), skq (S, B, NQ), gzx
        (B, D))``); parameter partials into dw / dv."""
        pk = self.packed
        B, D = gz1.shape
        n_tiles = triton.cdiv(B, self.BM)
        tab, needs = self._bwd_tables(gz1, "plain" if seeds is None else "seeded")
        gz0 = empty((B, D), gz1)
        sk, skq, gzx = seeds if seeds is not None else (gz1, gq1, gz1)
        launched("cnf_step_bwd_kernel")
        K.cnf_step_bwd_kernel[(nprog,)](
            tape, tab, needs, e, pk.W, pk.V, pk.dims, t0s, dts, n, gz1, gq1, sk, skq, gzx, gz0, dw, dv, scr, B, D,
            n_tiles, HAS_SEED=seeds is not None, **self._bwd_constexprs(time_f32))
        return gz0

    def backward_buffers(self, like):
        """``(dw, dv, scratch, programs)``: zeroed per-program parameter partials and the backward's scratch."""
        pk = self.packed
        B = like.shape[0]
        _, nprog = self.programs(B, like.device)
        SL = self.BM * pk.P
        per = (6 * pk.L + 2) * SL + (3 * self.spec.S + 1) * SL + 3 * self.BM
        dw = torch.zeros((nprog, pk.L, pk.P, pk.P), dtype=like.dtype, device=like.device)
        dv = torch.zeros((nprog, pk.L, 5, pk.P), dtype=like.dtype, device=like.device)
        return dw, dv, empty((nprog * per,), like), nprog

    def param_grads(self, dw, dv) -> list:
        """Per-parameter gradients ``[W, b, gw, gb, bw] * L`` from the programs' partials (a fixed-order sum)."""
        dw, dv = dw.sum(0), dv.sum(0)
        out = []
        for l in range(self.packed.L):
            o, i = self.packed.widths[l + 1], self.packed.widths[l]
            out += [dw[l, :o, :i], dv[l, 0, :o], dv[l, 1, :o], dv[l, 2, :o], dv[l, 3, :o]]
        return out

    def tile_backward(self, tape, e, ctl, steps_t, steps_h, cap, gb, qb, sk, skq, gzx, dw, dv, scr, time_f32):
        """The fused discrete adjoint of a per-tile solve in one launch (every tile walks its own steps in reverse):
        the start's cotangent into ``gb[3]``, parameter partials into ``dw`` / ``dv``."""
        B, D = gb.shape[1], gb.shape[2]
        tab, needs = self._bwd_tables(gb, "tiles")
        pk = self.packed
        launched("cnf_tile_bwd_kernel")
        K.cnf_tile_bwd_kernel[(dw.shape[0],)](
            tape, tab, needs, e, pk.W, pk.V, pk.dims, ctl, steps_t, steps_h, cap, gb, qb, sk, skq, gzx, dw, dv, scr, B,
            D, triton.cdiv(B, self.BM), **self._bwd_constexprs(time_f32))


def options(device, rtol, atol, safety, ifactor, dfactor, min_step, max_step, max_num_steps) -> torch.Tensor:
    """The kernels' options block (float64, indices ``O_*`` of :mod:`fastode.kernels.cnf_step`)."""
    return torch.tensor([rtol, atol, safety, ifactor, dfactor, min_step, max_step, float(max_num_steps)],
                        dtype=torch.float64, device=device)


def control_blocks(n: int, tau0, tend, dirn, dtp, nfe: float) -> torch.Tensor:
    """``n`` fresh control blocks (float64 ``(n, NCTL)``, indices ``C_*``): the clock at ``tau0`` with the end
    ``tend`` and direction ``dirn``, the proposed first step ``dtp`` (0: the kernel computes it), ``nfe`` evaluations
    so far; everything else zero."""
    ctl = torch.zeros((n, K.NCTL.value), dtype=torch.float64, device=tau0.device)
    for field, value in ((K.C_TAU, tau0), (K.C_TAUP, tau0), (K.C_TEND, tend), (K.C_DIR, dirn), (K.C_DTP, dtp),
                         (K.C_NFE, nfe)):
        ctl[:, field.value] = value
    return ctl
