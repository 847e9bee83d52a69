"""One definition of each code (fastode/codes.py), which the kernels, the launchers and the C++ core share.

The C++ enums repeat the numbers (C++ cannot import Python): pinned here through the extension. The Triton kernels
and every Python user take them from fastode.codes (checked by identity), so a code changed there changes
everywhere or fails here.
"""
import pytest

import fastode.cpp as fc
from fastode.codes import ACTIVATION_CODES, ACTIVATION_NAMES, RATE_CODES, Status
from fastode.errors import MaxStepsExceededError, NonFiniteError, StepSizeUnderflowError
from fastode.ops.concatsquash import ACTIVATIONS


@pytest.mark.skipif(not fc.available(), reason="the C++ extension fastode._C is not built")
def test_the_cpp_enums_are_the_python_codes():
    from fastode.cpp._loader import ext

    cpp = ext().codes()
    assert cpp["activation"] == ACTIVATION_CODES
    assert cpp["rate"] == RATE_CODES
    assert cpp["status"] == {s.name: int(s) for s in Status if s is not Status.TAPE_FULL}  # Triton's alone
    for name, code in ACTIVATION_CODES.items():
        assert ext().act_code(name) == code


def test_every_user_takes_the_codes_from_one_module():
    import fastode.cpp._mlp as cpp_mlp
    import fastode.cpp._rk as cpp_rk

    assert cpp_mlp._ACT_CODES is ACTIVATION_CODES and cpp_mlp._ACT_NAMES is ACTIVATION_NAMES
    assert cpp_rk.RATE_CODES is RATE_CODES and fc.RATE_CODES is RATE_CODES
    assert set(ACTIVATION_NAMES) == set(ACTIVATIONS)  # every activation of the reference has a code
    triton = pytest.importorskip("triton")
    del triton
    import fastode.kernels._common as KC
    import fastode.kernels.cnf_solve as CSV
    import fastode.kernels.cnf_step as K

    assert KC.ACT_CODES is ACTIVATION_CODES and CSV.RATE_CODES is RATE_CODES
    assert (KC.ACT_TANH.value, KC.ACT_SOFTPLUS.value, KC.ACT_ELU.value, KC.ACT_SWISH.value) == tuple(
        ACTIVATION_CODES[a] for a in ("tanh", "softplus", "elu", "swish"))
    assert (K.RATE_NEG_TRACE.value, K.RATE_TRACE.value, K.RATE_KINETIC.value) == (0, 1, 2) == tuple(
        RATE_CODES[r] for r in ("-trace", "trace", "kinetic"))
    assert [K.ST_MAX_STEPS.value, K.ST_UNDERFLOW.value, K.ST_NONFINITE.value, K.ST_TAPE_FULL.value] == [
        float(Status.MAX_STEPS), float(Status.UNDERFLOW), float(Status.NONFINITE), float(Status.TAPE_FULL)]


@pytest.mark.parametrize("status, cls", [(Status.MAX_STEPS, MaxStepsExceededError),
                                         (Status.UNDERFLOW, StepSizeUnderflowError),
                                         (Status.NONFINITE, NonFiniteError), (Status.TAPE_FULL, RuntimeError)])
def test_each_status_has_its_message_and_error(status, cls):
    err = status.error("at t=0.25 in tile 1", 1e-5, 1e-6, 77)
    assert type(err) is cls and "at t=0.25 in tile 1" in str(err) and status.message
    if status is Status.MAX_STEPS:
        assert "(77)" in str(err)
    if status is Status.UNDERFLOW:
        assert "rtol=1e-05" in str(err)
