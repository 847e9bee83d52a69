"""The compiled engine's loop (fastode/compiled/loop.py) run without compiling, against the eager solver.

``AdaptiveLoop`` restates ``RKAdaptiveSolver``'s attempt with tensors only; run as a plain Python loop
(``python_loop``: the same body ``while_loop`` compiles) it must take the eager loop's accepted steps, count its
evaluations and give its outputs, for every adaptive method and every option that changes where steps end. The
reference is ``fastode.odeint`` with ``return_stats`` (itself held to torchdiffeq's steps by
test_parity_torchdiffeq.py). Fast: nothing here compiles.
"""
import math

import pytest
import torch

import fastode
from fastode.codes import Status
from fastode.compiled.loop import AdaptiveLoop, python_loop
from fastode.driver import build_solver
from fastode.inputs import check_inputs
from fastode.norms import max_norm
from fastode.solvers import SOLVERS

from problems import ADAPTIVE_METHODS, PROBLEMS, TupleODE, construct_problem


def vdp(t, y):
    return torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


def forced(t, y):   # time-dependent, so stage times matter
    return -0.5 * y + torch.sin(3 * t) * y.flip(-1)


def loop_solve(func, y0, t, capacity=4096, chunk=1, **kw):
    norm = check_inputs(func, y0, t, kw.pop("rtol", 1e-6), kw.pop("atol", 1e-6), kw.pop("method", None),
                        kw.pop("options", None), None, SOLVERS)
    solver = build_solver(norm)
    lp = AdaptiveLoop(solver, norm.func.base, capacity=capacity, chunk=chunk)
    st = lp.solve(norm.y0, norm.t.to(solver.time_dtype), float(norm.t[0]), python_loop)
    return lp, st, norm


def assert_same_solve(func, y0, t, rel=1e-10, **kw):
    """Same steps, counts and outputs. ``rel``: torch's vectorised pow (the controller's ``r ** (1/order)`` in
    tensor form) can differ from Python's by an ulp, and a rejected attempt's error estimate (a difference of
    nearly equal stage sums) amplifies that to ~1e-12 in the following step sizes (dopri8)."""
    lp, st, norm = loop_solve(func, y0, t, **dict(kw))
    ref, stats = fastode.odeint(func, y0, t, rtol=kw.get("rtol", 1e-6), atol=kw.get("atol", 1e-6),
                                method=kw.get("method"), options=kw.get("options"), return_stats=True)
    assert int(st.status) == Status.SOLVED
    n = int(st.n_accepted)
    assert n == stats.num_accepted_steps
    assert int(st.n_rejected) == stats.num_rejected_steps
    assert int(st.n_attempts) == stats.num_steps
    assert int(lp.num_fevals(st)) == stats.num_fevals
    sign = -1.0 if norm.t_is_reversed else 1.0
    steps = torch.tensor([sign * v for v in st.tape_t[:n].tolist()], dtype=torch.float64)
    assert torch.allclose(steps, torch.tensor(stats.step_ts, dtype=torch.float64), rtol=rel, atol=rel)
    ys = st.ys if norm.shapes is None else None
    if ys is not None:   # values to 1e-12 relative in float64
        scale = ref.abs().max()
        assert (ys - ref).abs().max() <= (1e-12 if y0.dtype == torch.float64 else rel) * scale, (ys - ref).abs().max()
    return st


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_every_adaptive_method_takes_the_eager_steps(method):
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 4, 6, dtype=torch.float64)
    rtol = 1e-3 if method in ("fehlberg2", "adaptive_heun") else 1e-6   # keep the low-order solves short
    assert_same_solve(vdp, y0, t, method=method, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("ode", sorted(PROBLEMS))
@pytest.mark.parametrize("reverse", [False, True])
def test_the_shared_problem_set(ode, reverse):
    """torchdiffeq's problem helper (tests/problems.py): the eager solver's steps, and the analytic solution."""
    f, y0, t, sol = construct_problem(ode=ode, reverse=reverse)
    st = assert_same_solve(f, y0.detach(), t.detach(), rtol=1e-8, atol=1e-10)
    assert torch.allclose(st.ys, sol.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [
    {"interp": "dense"}, {"land_on": "all"}, {"land_on": "end"}, {"step_t": [0.33, 1.7, 2.5]},
    {"jump_t": [0.33, 1.7, 2.5]}, {"max_step": 0.1, "min_step": 0.01}, {"first_step": 0.01},
    {"safety": 0.8, "ifactor": 5.0, "dfactor": 0.3}, {"dtype": torch.float32}, {"norm": max_norm},
    {"norm": lambda e: e.abs().mean()},
], ids=lambda o: ",".join(o))
def test_options_that_move_step_ends(options):
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 1.0, 1.7, 3.0], dtype=torch.float64)
    assert_same_solve(forced, y0, t, options=options)


@pytest.mark.parametrize("chunk", [2, 3])
@pytest.mark.parametrize("options", [{}, {"land_on": "all", "step_t": [0.33, 1.7]}, {"max_num_steps": 4}], ids=str)
def test_chunks_of_attempts_past_the_end_change_nothing(chunk, options):
    """Several attempts per loop iteration (one host read per chunk on CUDA): those after the end or after a
    failure must be no-ops, so the result is the one-attempt loop's."""
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 1.0, 1.7, 3.0], dtype=torch.float64)
    _, one, _ = loop_solve(forced, y0, t, options=options)
    _, many, _ = loop_solve(forced, y0, t, chunk=chunk, options=options)
    n = int(one.n_accepted)
    for name in one._fields:   # the tape's rows past n_accepted are scratch
        a, b = getattr(one, name), getattr(many, name)
        if name.startswith("tape"):
            a, b = a[:n], b[:n]
        assert torch.allclose(a.double(), b.double(), equal_nan=True, rtol=0, atol=0), name


def test_reverse_time_tuple_states_float32_and_0dim():
    t = torch.linspace(3, 0, 4, dtype=torch.float64)
    assert_same_solve(forced, torch.tensor([1.0, -0.5], dtype=torch.float64), t)
    assert_same_solve(forced, torch.tensor([1.0, -0.5]), t.float(), rel=1e-5)
    assert_same_solve(lambda t, y: -y * torch.cos(t), torch.tensor(1.5, dtype=torch.float64),
                      torch.tensor([0.0, 2.0], dtype=torch.float64))
    y0 = (torch.randn(2, 3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    st = assert_same_solve(TupleODE(), y0, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    ref = fastode.odeint(TupleODE(), y0, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    flat = torch.cat([ref[0].reshape(3, -1), ref[1].reshape(3, 1)], 1)
    assert torch.allclose(st.ys, flat, rtol=1e-12, atol=1e-14)


def test_a_bad_status_stops_the_loop_where_the_eager_loop_raises():
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 10.0], dtype=torch.float64)
    _, st, _ = loop_solve(vdp, y0, t, options={"max_num_steps": 5})
    assert int(st.status) == Status.MAX_STEPS and int(st.n_attempts) == 5
    with pytest.raises(fastode.errors.MaxStepsExceededError):
        fastode.odeint(vdp, y0, t, rtol=1e-6, atol=1e-6, options={"max_num_steps": 5})

    def blowup(t, y):   # finite-time blow-up at t = 1: the step size underflows
        return y ** 2
    _, st, _ = loop_solve(blowup, torch.tensor([1.0], dtype=torch.float64), t)
    assert int(st.status) in (Status.UNDERFLOW, Status.NONFINITE)
    assert abs(float(st.t_fail) - 1.0) < 1e-3
    assert math.isnan(float(st.ys[-1, 0]))   # an output never reached stays poisoned


def test_a_full_tape_stops_with_tape_full():
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    _, st, _ = loop_solve(vdp, y0, torch.tensor([0.0, 10.0], dtype=torch.float64), capacity=8)
    assert int(st.status) == Status.TAPE_FULL and int(st.n_accepted) == 8


FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic")


@pytest.mark.parametrize("method", FIXED)
@pytest.mark.parametrize("options", [{"step_size": 0.1}, {"step_size": 0.13, "interp": "cubic"},
                                     {"step_size": 0.1, "perturb": True}, {}], ids=str)
def test_fixed_grid_loop_takes_the_eager_steps(method, options):
    from fastode.compiled.grid_loop import GridLoop

    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.4, 1.0], dtype=torch.float64)
    norm = check_inputs(forced, y0, t, 1e-6, 1e-6, method, options, None, SOLVERS)
    solver = build_solver(norm)
    ctx = solver.prepare(norm.t)
    lp = GridLoop(solver, norm.func.base, ctx.grid.dtype, ctx.grid.shape[0] - 1)
    st = lp.solve(norm.y0, norm.t, ctx.grid, python_loop)
    ref, stats = fastode.odeint(forced, y0, t, method=method, options=options, return_stats=True)
    assert int(st.i) == stats.num_steps and int(st.first_bad) == stats.num_steps
    assert int(lp.num_fevals(st)) <= stats.num_fevals   # cubic outputs: one end evaluation per step, not per output
    assert torch.allclose(st.ys, ref, rtol=1e-13, atol=1e-14), (st.ys - ref).abs().max()
