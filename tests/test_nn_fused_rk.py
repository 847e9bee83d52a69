"""The solver's CUDA-only dispatch to the fused RK kernels (fastode.nn.fused_rk, called by rk_step)."""
import os

import pytest
import torch

from fastode.nn import fused_rk
from fastode.norms import mixed_norm, rms_norm

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def test_inert_on_cpu_and_for_other_norms():
    k = [torch.randn(4, 3) for _ in range(3)]
    assert fused_rk.combine_stages(k[0], 0.1, [0.5, 0.5], k) is None
    assert fused_rk.error_ratio(k[0], k[1], k[2], 1e-3, 1e-6, rms_norm) is None
    if CUDA:
        kc = [x.cuda() for x in k]
        assert fused_rk.error_ratio(kc[0], kc[1], kc[2], 1e-3, 1e-6, mixed_norm) is None
        assert fused_rk.combine_stages(kc[0], 0.1, [torch.tensor(0.5)], kc) is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.05}), ("dopri5", None)])
def test_solver_on_cuda_uses_fused_kernels_and_matches_torch_path(monkeypatch, method, options):
    import fastode

    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], device="cuda", dtype=torch.float64)
    y0 = torch.randn(64, 2, device="cuda", dtype=torch.float64)
    t = torch.linspace(0, 2, 5, device="cuda", dtype=torch.float64)
    func = lambda t, y: y @ A.T  # noqa: E731
    used = []
    for name in ("combine_stages", "error_ratio"):
        orig = getattr(fused_rk, name)

        def spy(*a, _orig=orig):
            out = _orig(*a)
            used.append(out is not None)
            return out

        monkeypatch.setattr(fused_rk, name, spy)
    fused = fastode.odeint(func, y0, t, rtol=1e-8, atol=1e-10, method=method, options=options)
    assert any(used), "no fused kernel was dispatched on CUDA"
    monkeypatch.setenv("FASTODE_FUSED_RK", "0")
    plain = fastode.odeint(func, y0, t, rtol=1e-8, atol=1e-10, method=method, options=options)
    torch.testing.assert_close(fused, plain, rtol=1e-9, atol=1e-11)
