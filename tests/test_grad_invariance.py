"""The values of a solve never depend on which inputs require grad, nor on ``torch.no_grad``: bit for bit.

A downstream test suite compares gradients computed with and without a differentiable ``t`` (or with the state or
the parameters frozen) and expects identical forward values, as torchdiffeq gives them. Every method, both dtypes,
each gradient mode, y0 / t / the parameters requiring grad or not: each solve must equal the solve with nothing
requiring grad, exactly (compared as raw bits, so a -0.0 for a 0.0 or a NaN payload would show too).
"""
import pytest
import torch

from fastode import odeint
from fastode.solvers import SOLVERS

METHODS = [m for m in SOLVERS if m != "scipy_solver"]   # scipy integrates in numpy: no autograd paths to differ
FIXED = {"euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic", "fixed_adams"}

# which inputs require grad, and whether grad mode is on
CASES = {
    "y0": ("y0",), "t": ("t",), "params": ("params",), "all": ("y0", "t", "params"),
    "all-no_grad": ("y0", "t", "params", "no_grad"),
}


class Linear(torch.nn.Module):
    """``y' = tanh(y A) * (1 + t)`` with an 8x8 A: time enters every stage (stage times' arithmetic matters)."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A = torch.nn.Parameter(torch.randn(8, 8, generator=g, dtype=dtype) / 3)

    def forward(self, t, y):
        return torch.tanh(y @ self.A) * (1 + t)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().view(torch.int64 if x.dtype == torch.float64 else torch.int32)


def _solve(method, dtype, grad_on, gradient, t_values, extra=None):
    func = Linear(dtype)
    y0 = torch.linspace(-1, 1, 32, dtype=dtype).reshape(4, 8)
    t = torch.tensor(t_values, dtype=dtype)
    for p in func.parameters():
        p.requires_grad_("params" in grad_on)
    y0.requires_grad_("y0" in grad_on)
    t.requires_grad_("t" in grad_on)
    options = {"step_size": 0.1} if method in FIXED else {}
    options.update(extra or {})
    kwargs = {"rtol": 1e-5, "atol": 1e-6, "method": method, "options": options}
    if gradient != "direct":
        kwargs["gradient"] = gradient
        kwargs["adjoint_params"] = tuple(func.parameters())
    with torch.set_grad_enabled("no_grad" not in grad_on):
        return odeint(func, y0, t, **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", METHODS)
def test_values_do_not_depend_on_requires_grad(method, dtype, case):
    # output times off the grid (interpolation) and decreasing ones are both covered by the two time sets
    for t_values in ([0.0, 0.33, 0.7, 1.0], [1.0, 0.45, 0.0]):
        ref = _solve(method, dtype, (), "direct", t_values)
        got = _solve(method, dtype, CASES[case], "direct", t_values)
        assert torch.equal(_bits(got), _bits(ref)), (
            f"{method} {dtype} {case} t={t_values}: {int((got != ref).sum())} of {got.numel()} elements differ, max "
            f"{float((got.detach() - ref).abs().max()):.3g}")


@pytest.mark.parametrize("gradient", ["checkpoint", "adjoint"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk4", "heun3", "implicit_adams"])
def test_gradient_modes_give_the_direct_values(method, dtype, gradient):
    """The other gradient modes run the same forward loop: their values equal the direct mode's, grad or not."""
    if gradient == "checkpoint" and "adams" in method:
        pytest.skip("gradient='checkpoint' runs one-step methods only (it raises for multistep ones)")
    t_values = [0.0, 0.33, 0.7, 1.0]
    ref = _solve(method, dtype, (), "direct", t_values)
    for case in ("all", "t"):
        got = _solve(method, dtype, CASES[case], gradient, t_values)
        assert torch.equal(_bits(got), _bits(ref)), f"{method} {gradient} {dtype} {case}"


OPTION_PATHS = [
    ("rk4", {"interp": "cubic"}), ("heun3", {"perturb": True}), ("midpoint", {"interp": "cubic", "perturb": True}),
    ("dopri5", {"interp": "dense"}), ("tsit5", {"land_on": "all"}), ("dopri5", {"step_t": [0.2, 0.5]}),
    ("bosh3", {"jump_t": [0.25, 0.6]}), ("dopri5", {"first_step": 0.05, "max_step": 0.1}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method,extra", OPTION_PATHS, ids=[f"{m}-{'-'.join(e)}" for m, e in OPTION_PATHS])
def test_option_paths_do_not_depend_on_requires_grad(method, extra, dtype):
    """Interpolants, perturbed stage times, step_t/jump_t clipping and landing (whose clipped steps carry a time
    gradient in their step size) give the same values with and without a differentiable t."""
    for t_values in ([0.0, 0.33, 0.7, 1.0], [1.0, 0.45, 0.0]):
        if "step_t" in extra or "jump_t" in extra:
            t_values = sorted(t_values)
        ref = _solve(method, dtype, (), "direct", t_values, extra)
        for case in ("t", "all"):
            got = _solve(method, dtype, CASES[case], "direct", t_values, extra)
            assert torch.equal(_bits(got), _bits(ref)), f"{method} {extra} {dtype} {case} t={t_values}"


# ------------------------------------------------------------------------------------------------ CNF engines
def _cnf_values(engine, method, dtype, grad_on, learn_T):
    from fastode.flows import CNF
    from fastode.flows.regularizers import KineticEnergy
    from fastode.nn import ConcatSquashMLP

    torch.manual_seed(0)
    step = {"step_size": 0.1} if method == "rk4" else {}
    cnf = CNF(ConcatSquashMLP(2, (16, 16), "tanh"), T=0.5, learn_T=learn_T, method=method, engine=engine,
              regularizers=[KineticEnergy(0.1)], **step).to(dtype).train()
    for p in cnf.parameters():
        p.requires_grad_("params" in grad_on)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 2, generator=g, dtype=dtype).requires_grad_("y0" in grad_on)
    e = torch.randn(37, 2, generator=g, dtype=dtype)
    with torch.set_grad_enabled("no_grad" not in grad_on):
        out = cnf(x, noise=e)
    assert cnf.last_solve.engine == engine
    return torch.cat([out.out.detach().reshape(-1), out.logdet.detach().reshape(-1)]
                     + [v.detach().reshape(-1) for v in out.reg.values()])


@pytest.mark.parametrize("learn_T", [False, True], ids=["fixed_T", "learn_T"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("engine,method", [("odeint", "rk4"), ("odeint", "dopri5"), ("cpp_grid", "rk4"),
                                           ("cpp_adaptive", "dopri5")])
def test_cnf_engines_do_not_depend_on_requires_grad(engine, method, dtype, learn_T):
    """Each CNF engine (forced) gives the same bits with the input, the parameters (and the learned end time)
    requiring grad or not, and under no_grad. The Hutchinson probe is fixed, so only the grad paths could differ."""
    import fastode.cpp as fc

    if engine.startswith("cpp") and not fc.available():
        pytest.skip("the C++ extension fastode._C is not built")
    ref = _cnf_values(engine, method, dtype, (), learn_T)
    for case in ("y0", "params", "all", "all-no_grad"):
        got = _cnf_values(engine, method, dtype, CASES[case], learn_T)
        assert torch.equal(_bits(got), _bits(ref)), f"{engine} {method} {dtype} {case}"
