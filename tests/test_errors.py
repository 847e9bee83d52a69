"""Every error path: the right class (catchable the torchdiffeq way) and a message that says what to do."""

import pytest
import torch

import fastode
from fastode import errors as E

Y0 = torch.ones(2)
T = torch.tensor([0.0, 1.0])
F = lambda t, y: -y  # noqa: E731


def test_error_classes_subclass_torchdiffeq_catchables():
    assert issubclass(E.InvalidTimeError, ValueError) and issubclass(E.InvalidTimeError, AssertionError)
    assert issubclass(E.TimeDtypeError, TypeError)
    assert issubclass(E.InvalidMethodError, ValueError)
    for cls in (E.StepSizeUnderflowError, E.MaxStepsExceededError, E.NonFiniteError, E.FuncOutputError):
        assert issubclass(cls, RuntimeError) and issubclass(cls, AssertionError)
    assert issubclass(E.InvalidStateError, ValueError) and issubclass(E.InvalidStateError, AssertionError)


@pytest.mark.parametrize("t,cls,match", [
    (torch.tensor([0.0, 1.0, 0.5]), E.InvalidTimeError, r"strictly increasing or decreasing: t\[1\]=1.0 and t\[2\]=0.5"),
    (torch.tensor([0.0, 0.0, 1.0]), E.InvalidTimeError, "strictly increasing or decreasing"),
    (torch.tensor([[0.0, 1.0]]), E.InvalidTimeError, r"one dimensional, got shape \(1, 2\)"),
    (torch.tensor(1.0), E.InvalidTimeError, "one dimensional"),
    (torch.tensor([0, 1]), E.TimeDtypeError, "floating point Tensor"),
    ([0.0, 1.0], E.InvalidTimeError, "must be a torch.Tensor"),
    (torch.tensor([0.0, float("nan")]), E.InvalidTimeError, "finite"),
    (torch.tensor([]), E.InvalidTimeError, "at least one time point"),
])
def test_bad_time(t, cls, match):
    with pytest.raises(cls, match=match):
        fastode.odeint(F, Y0, t)


def test_bad_time_is_an_assertion_error_like_torchdiffeq():
    try:
        fastode.odeint(F, Y0, torch.tensor([0.0, 1.0, 0.5]))
    except AssertionError as e:
        assert "strictly" in str(e)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match=r'Invalid method "dopri45". Must be one of .*"dopri5".*"rk4".*Did you mean '
                                         r"'dopri5'"):
        fastode.odeint(F, Y0, T, method="dopri45")


def test_options_without_method_warn_clearly():
    with pytest.warns(UserWarning, match=r"options \['step_size'\] were given without `method`.*method='rk4'"):
        fastode.odeint(F, Y0, T, options=dict(step_size=0.1))


def test_unknown_option_warns_like_torchdiffeq():
    with pytest.warns(UserWarning, match=r"Dopri5Solver: Unexpected arguments \{'bogus': 1\}"):
        fastode.odeint(F, Y0, T, method="dopri5", options=dict(bogus=1))
    with pytest.warns(UserWarning, match=r"RK4: Unexpected arguments \{'first_step': 0.1\}"):
        fastode.odeint(F, Y0, T, method="rk4", options=dict(first_step=0.1))


def test_options_dict_is_not_mutated():
    opts = dict(step_t=torch.tensor([0.5]))
    fastode.odeint(F, Y0, torch.tensor([1.0, 0.0]), method="dopri5", options=opts)
    assert set(opts) == {"step_t"} and float(opts["step_t"][0]) == 0.5


@pytest.mark.parametrize("y0,cls,match", [
    ([torch.ones(2)], E.InvalidStateError, r"tuple of tensors, got list \(convert the list with tuple\(y0\)\)"),
    (torch.tensor([1.0, float("nan")]), E.InvalidStateError, "NaN or inf"),
    (torch.tensor([1, 2]), E.InvalidStateError, "floating point"),
    ((torch.ones(2), 3.0), E.InvalidStateError, r"y0\[1\] must be a torch.Tensor"),
])
def test_bad_y0(y0, cls, match):
    with pytest.raises(cls, match=match):
        fastode.odeint(F, y0, T)


def test_bad_tolerances():
    with pytest.raises(E.InvalidStateError, match="rtol cannot require gradient"):
        fastode.odeint(F, Y0, T, rtol=torch.tensor(1e-3, requires_grad=True))
    with pytest.raises(E.InvalidStateError, match="atol must be finite and non-negative"):
        fastode.odeint(F, Y0, T, atol=-1.0)
    with pytest.raises(E.InvalidStateError, match="same length as the tuple y0"):
        fastode.odeint(lambda t, y: (-y[0], -y[1]), (Y0, Y0), T, rtol=[1e-3])


def test_func_output_errors_name_the_time():
    with pytest.raises(E.FuncOutputError, match=r"returned a tensor of shape \(\) at t=0.0, .* same shape as y, \(2,\)"):
        fastode.odeint(lambda t, y: y.sum(), Y0, T)
    with pytest.raises(E.FuncOutputError, match="returned a float"):
        fastode.odeint(lambda t, y: 1.0, Y0, T, method="rk4")
    with pytest.raises(E.FuncOutputError, match=r"tuple of 2 tensors with the shapes of y: \(\(2,\), \(\)\)"):
        fastode.odeint(lambda t, y: (-y[0],), (Y0, torch.tensor(1.0)), T)
    # reversed time: the reported time is the user's
    with pytest.raises(E.FuncOutputError, match="at t=2.0"):
        fastode.odeint(lambda t, y: y.sum(), Y0, torch.tensor([2.0, 1.0]))


def test_nonfinite_func_adaptive_names_the_time():
    with pytest.raises(E.NonFiniteError, match=r"func returned NaN/inf in stage \d of the step from t=1.19"):
        fastode.odeint(lambda t, y: torch.log(1.2 - t) * y, Y0, torch.tensor([0.0, 2.0]))
    with pytest.raises(E.NonFiniteError, match="at the initial time t=0.0"):
        fastode.odeint(lambda t, y: torch.log(-t) * y, Y0, T)
    with pytest.raises(E.NonFiniteError, match="accepted because dt <= min_step"):
        fastode.odeint(lambda t, y: torch.log(1.2 - t) * y, Y0, torch.tensor([0.0, 2.0]),
                       options=dict(min_step=0.01))


def test_nonfinite_fixed_grid_names_the_step():
    f = lambda t, y: torch.where(t < 0.5, -y, y * float("nan"))  # noqa: E731
    with pytest.raises(E.NonFiniteError, match=r"from t=0.5 to t=0.6.*reduce step_size.*check_finite"):
        fastode.odeint(f, Y0, torch.tensor([0.0, 2.0]), method="euler", options=dict(step_size=0.1))
    # reversed: user's times
    with pytest.raises(E.NonFiniteError, match=r"from t=-0.5 to t=-0.6"):
        fastode.odeint(lambda t, y: torch.where(t > -0.5, -y, y * float("nan")), Y0, torch.tensor([0.0, -2.0]),
                       method="euler", options=dict(step_size=0.1))
    out = fastode.odeint(f, Y0, torch.tensor([0.0, 2.0]), method="euler", options=dict(step_size=0.1,
                                                                                       check_finite=False))
    assert torch.isnan(out[-1]).all()


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("complex_state", [False, True])
def test_nonfinite_fixed_grid_single_entry(bad, complex_state):
    # one non-finite entry among finite ones (inf of either sign, NaN; complex: in the imaginary part) is caught
    y0 = torch.zeros(3, 5, dtype=torch.complex128 if complex_state else torch.float64)

    def f(t, y):
        dy = torch.zeros_like(y)
        if float(t) >= 0.5:
            dy[1, 2] = complex(0.0, bad) if complex_state else bad
        return dy

    with pytest.raises(E.NonFiniteError, match=r"from t=0.5 to t=0.75 "):
        fastode.odeint(f, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="euler",
                       options=dict(step_size=0.25))


def test_step_size_underflow_suggests_remedies():
    # y' = y^2 blows up at t = 1
    with pytest.raises(E.StepSizeUnderflowError) as info:
        fastode.odeint(lambda t, y: y ** 2, torch.ones(2, dtype=torch.float64),
                       torch.tensor([0.0, 2.0], dtype=torch.float64))
    msg = str(info.value)
    assert msg.startswith("underflow in dt") and "at t=1.0000" in msg
    for remedy in ("smoother activations", "loosen rtol/atol", "'min_step'", "fixed-step solver"):
        assert remedy in msg


def test_max_num_steps_is_finite_by_default_and_explains():
    from fastode.solvers.rk_adaptive import DEFAULT_MAX_NUM_STEPS
    assert DEFAULT_MAX_NUM_STEPS == 10_000
    stiff = lambda t, y: -1e6 * (y - torch.cos(t))  # noqa: E731
    with pytest.raises(E.MaxStepsExceededError, match=r"max_num_steps exceeded \(200>=200\).*did not reach t=10.0.*"
                                                      r"raise options=\{'max_num_steps'"):
        fastode.odeint(stiff, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 10.0], dtype=torch.float64),
                       options=dict(max_num_steps=200))


def test_bad_option_values():
    with pytest.raises(E.InvalidOptionError, match="min_step <= max_step"):
        fastode.odeint(F, Y0, T, method="dopri5", options=dict(min_step=1.0, max_step=0.1))
    with pytest.raises(E.InvalidOptionError, match="step_size must be a positive finite number"):
        fastode.odeint(F, Y0, T, method="rk4", options=dict(step_size=-0.1))
    with pytest.raises(ValueError, match="step_size and grid_constructor are mutually exclusive"):
        fastode.odeint(F, Y0, T, method="rk4", options=dict(step_size=0.1, grid_constructor=lambda f, y, t: t))
    with pytest.raises(E.InvalidOptionError, match="must start at t\\[0\\] and end at t\\[-1\\]"):
        fastode.odeint(F, Y0, T, method="rk4", options=dict(grid_constructor=lambda f, y, t: torch.tensor([0.0, 0.5])))
    with pytest.raises(E.InvalidOptionError, match="non-decreasing"):
        fastode.odeint(F, Y0, T, method="rk4",
                       options=dict(grid_constructor=lambda f, y, t: torch.tensor([0.0, 0.7, 0.4, 1.0])))
    with pytest.raises(ValueError, match="Unknown interpolation method"):
        fastode.odeint(F, Y0, T, method="rk4", options=dict(interp="quadratic"))
    with pytest.raises(E.InvalidOptionError, match="interp='dense' needs a method with its own dense output"):
        fastode.odeint(F, Y0, T, method="bosh3", options=dict(interp="dense"))
    with pytest.raises(E.InvalidOptionError, match="land_on must be None"):
        fastode.odeint(F, Y0, T, options=dict(land_on="sometimes"))
    with pytest.raises(E.InvalidOptionError, match="max_num_steps must be a positive integer"):
        fastode.odeint(F, Y0, T, options=dict(max_num_steps=0))
    with pytest.raises(ValueError, match="must not have any repeated elements"):
        fastode.odeint(F, Y0, T, options=dict(step_t=[0.5], jump_t=[0.5]))


def test_event_mode_requires_two_times():
    with pytest.raises(ValueError, match=r"len\(t\) == 2 when in event handling mode, but got len\(t\)=3"):
        fastode.odeint(F, Y0, torch.tensor([0.0, 1.0, 2.0]), event_fn=lambda t, y: y[0] - 0.5)


def test_fixed_grid_event_requires_step_size():
    with pytest.raises(E.InvalidOptionError, match="requires `step_size`"):
        fastode.odeint(F, Y0, T, method="rk4", event_fn=lambda t, y: y[0] - 0.5)


def test_event_that_never_fires_does_not_hang():
    with pytest.raises(E.MaxStepsExceededError, match="the event did not occur"):
        fastode.odeint(F, Y0, T, event_fn=lambda t, y: y[0] + 1.0, options=dict(max_num_steps=300))


def test_unavailable_lazy_method_error_is_clear(monkeypatch):
    import fastode.solvers as S
    monkeypatch.setitem(S._LAZY, "explicit_adams", (".does_not_exist", "X"))
    with pytest.raises(ImportError, match="method 'explicit_adams' is unavailable.*do not depend on it"):
        fastode.odeint(F, Y0, T, method="explicit_adams")
    # other methods are unaffected
    fastode.odeint(F, Y0, T, method="rk4")


def test_stiff_max_steps_suggests_an_implicit_solver():
    stiff = lambda t, y: -1e6 * (y - torch.cos(t))  # noqa: E731
    with pytest.raises(E.MaxStepsExceededError, match=r"stiff.*method='scipy_solver'.*'LSODA'.*'BDF', 'Radau'"):
        fastode.odeint(stiff, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 10.0], dtype=torch.float64),
                       options=dict(max_num_steps=200))
    # and what it suggests works on that problem
    pytest.importorskip("scipy")
    y = fastode.odeint(stiff, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 10.0], dtype=torch.float64),
                       method="scipy_solver", options=dict(solver="LSODA"))
    assert torch.allclose(y[-1], torch.cos(torch.tensor(10.0, dtype=torch.float64)).expand(2), atol=1e-5)


def test_tuple_state_shape_error_names_the_component():
    f = lambda t, y: (y[0], torch.zeros(2))  # noqa: E731
    with pytest.raises(E.FuncOutputError) as info:
        fastode.odeint(f, (torch.ones(2), torch.ones(1)), T)
    msg = str(info.value)
    assert "component 1 with shape (2,) where y[1] has shape (1,)" in msg and "'" not in msg.split("at t=")[0]
    with pytest.raises(E.FuncOutputError, match=r"returned 1 components with shapes \(\(2,\)\)"):
        fastode.odeint(lambda t, y: (y[0],), (torch.ones(2), torch.ones(1)), T)


def test_method_name_case_gets_a_did_you_mean():
    with pytest.raises(E.InvalidMethodError, match=r"Invalid method \"RK4\".*Did you mean 'rk4'"):
        fastode.odeint(F, Y0, T, method="RK4")
    with pytest.raises(E.InvalidMethodError, match=r"Did you mean 'dopri5'"):
        fastode.odeint(F, Y0, T, method="Dopri5")


@pytest.mark.parametrize("method,name", [("rk4", "step_size"), ("dopri5", "first_step"), ("dopri5", "max_step")])
def test_numeric_option_given_as_a_string_is_a_clear_error(method, name):
    with pytest.raises(E.InvalidOptionError, match=rf"option '{name}' must be a number, got '0.1' of type str "
                                                   rf"\(pass {name}=0.1\)"):
        fastode.odeint(F, Y0, T, method=method, options={name: "0.1"})


def test_unknown_option_says_it_is_ignored():
    with pytest.warns(UserWarning, match=r"Unexpected arguments \{'bogus': 1\}: this method does not use them, so "
                                         r"they are ignored"):
        fastode.odeint(F, Y0, T, method="dopri5", options=dict(bogus=1))
