"""The ops registry's written rules (fastode/ops/registry.py) and the RK ops a solver resolves once per solve."""
import os

import pytest
import torch

from fastode.norms import max_norm, mixed_norm, rms_norm
from fastode.ops import registry
from fastode.ops import rk as spec

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.fixture
def toy_op():
    """A private op with a reference, a CPU backend that refuses odd sizes, and a backend that never loads."""
    op = "test.double"
    registry.register(op, registry.REFERENCE, lambda x: 2 * x, devices=("*",),
                      auto={"cpu": ("fast", "ghost", registry.REFERENCE)})
    registry.register(op, "fast", lambda x: x + x, devices=("cpu",),
                      supports=lambda x: None if x.numel() % 2 == 0 else "odd sizes are not tiled")
    registry.register_lazy("ghost", "fastode._no_such_module_")
    yield op
    registry._impls.pop(op)
    registry._auto.pop(op)


def test_auto_takes_the_first_candidate_that_can_run(toy_op):
    c = registry.resolve(toy_op, device_type="cpu", call=(torch.ones(4),))
    assert c.backend == "fast" and c.reason is None
    torch.testing.assert_close(c.impl(torch.ones(4)), 2 * torch.ones(4))


def test_auto_falls_back_with_every_reason_recorded(toy_op):
    c = registry.resolve(toy_op, device_type="cpu", call=(torch.ones(3),))
    assert c.backend == registry.REFERENCE
    names = [n for n, _ in c.skipped]
    assert names == ["fast", "ghost"]
    assert "odd sizes are not tiled" in c.reason and "_no_such_module_" in c.reason


def test_auto_on_other_devices_is_the_reference(toy_op):
    assert registry.resolve(toy_op, device_type="cuda").backend == registry.REFERENCE


def test_explicit_backend_that_cannot_run_raises_with_the_reason(toy_op):
    with pytest.raises(registry.BackendUnavailableError, match="odd sizes are not tiled"):
        registry.resolve(toy_op, "fast", device_type="cpu", call=(torch.ones(3),))
    with pytest.raises(registry.BackendUnavailableError, match="runs on cpu tensors, not cuda"):
        registry.resolve(toy_op, "fast", device_type="cuda")
    with pytest.raises(registry.BackendUnavailableError, match="not registered"):
        registry.resolve(toy_op, "nonexistent", device_type="cpu")
    assert issubclass(registry.BackendUnavailableError, ValueError)


def test_unknown_op_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown op"):
        registry.resolve("no.such.op")


def test_rk_ops_on_cpu_are_the_spec():
    ops = spec.resolve_rk_ops(torch.zeros(3), rms_norm)
    assert ops.backend == "torch"
    assert ops.combine is spec.combine_stages and ops.error_ratio is spec.error_ratio


def test_explicit_triton_rk_ops_on_cpu_need_cuda_or_the_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter makes CPU tensors eligible")
    with pytest.raises(registry.BackendUnavailableError, match="triton"):
        spec.resolve_rk_ops(torch.zeros(3), rms_norm, backend="triton")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_rk_ops_on_cuda_resolve_to_triton_for_rms_and_max_only(monkeypatch):
    pytest.importorskip("triton")
    y = torch.zeros(3, device="cuda")
    assert spec.resolve_rk_ops(y, rms_norm).backend == "triton"
    assert spec.resolve_rk_ops(y, max_norm).error_ratio is not spec.error_ratio
    ops = spec.resolve_rk_ops(y, mixed_norm)
    assert ops.error_ratio is spec.error_ratio and "RMS and max" in ops.reason
    monkeypatch.setenv("FASTODE_FUSED_RK", "0")
    assert spec.resolve_rk_ops(y, rms_norm).backend == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.05}), ("dopri5", None)])
def test_solver_on_cuda_uses_fused_kernels_and_matches_the_spec(monkeypatch, method, options):
    import fastode

    pytest.importorskip("triton")
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], device="cuda", dtype=torch.float64)
    y0 = torch.randn(64, 2, device="cuda", dtype=torch.float64)
    t = torch.linspace(0, 2, 5, device="cuda", dtype=torch.float64)
    func = lambda t, y: y @ A.T  # noqa: E731
    fused = fastode.odeint(func, y0, t, rtol=1e-8, atol=1e-10, method=method, options=options)
    monkeypatch.setenv("FASTODE_FUSED_RK", "0")
    plain = fastode.odeint(func, y0, t, rtol=1e-8, atol=1e-10, method=method, options=options)
    torch.testing.assert_close(fused, plain, rtol=1e-9, atol=1e-11)
