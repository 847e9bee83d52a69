"""fastode.export: a fixed-grid odeint over any traceable func as a static graph (torch.export strict and
non-strict, ONNX). Reference: fastode.odeint with the same method and grid (itself held to torchdiffeq); ONNX
Runtime's numbers against the module's (float32 rounding)."""
import math

import pytest
import torch

import fastode
from fastode.export import FixedGridODE, export_odeint


class Dyn(torch.nn.Module):
    def __init__(self, d=3, h=16):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, d))

    def forward(self, t, y):
        return self.net(y) * torch.cos(t) - 0.2 * y


T = torch.tensor([0.0, 0.33, 0.8, 1.0])


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.1}), ("euler", {"step_size": 0.07}),
                                            ("midpoint", {"step_size": 0.1, "interp": "cubic"}),
                                            ("rk4_classic", None), ("heun3", {"step_size": 0.1, "perturb": True})],
                         ids=str)
@pytest.mark.parametrize("reverse", [False, True])
def test_the_module_is_odeint(method, options, reverse):
    f = Dyn()
    y0 = torch.randn(5, 3)
    t = T.flip(0) if reverse else T
    model = FixedGridODE(f, y0, t, method=method, options=options)
    ref = fastode.odeint(f, y0, t, method=method, options=options)
    with torch.no_grad():
        got = model(y0)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7), (got - ref).abs().max()


def test_adaptive_methods_name_the_fixed_grid_alternative():
    with pytest.raises(ValueError, match="fixed-grid method"):
        FixedGridODE(Dyn(), torch.randn(2, 3), T, method="dopri5")


@pytest.mark.parametrize("strict", [True, False])
def test_torch_export_any_batch(strict, tmp_path):
    f = Dyn()
    y0 = torch.randn(4, 3)
    path = tmp_path / "ode.pt2"
    export_odeint(f, y0, T, path, method="rk4", options={"step_size": 0.1}, strict=strict)
    program = torch.export.load(str(path))
    y1 = torch.randn(9, 3)
    with torch.no_grad():
        got = program.module()(y1)
    ref = fastode.odeint(f, y1, T, method="rk4", options={"step_size": 0.1})
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_onnx_runtime_gives_the_same_numbers(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    f = Dyn()
    y0 = torch.randn(4, 3)
    path = tmp_path / "ode.onnx"
    export_odeint(f, y0, T, path, method="rk4", options={"step_size": 0.1})
    session = ort.InferenceSession(str(path))
    y1 = torch.randn(7, 3)
    (got,) = session.run(None, {session.get_inputs()[0].name: y1.numpy()})
    ref = fastode.odeint(f, y1, T, method="rk4", options={"step_size": 0.1})
    assert got.shape == tuple(ref.shape)
    assert torch.allclose(torch.from_numpy(got), ref, rtol=1e-5, atol=1e-6)
    # the analytic check of the exported grid itself: y' = -y
    one = torch.ones(2, 1, dtype=torch.float64)
    model = FixedGridODE(lambda t, y: -y, one, T.double(), method="rk4", options={"step_size": 0.01})
    assert torch.allclose(model(one)[-1], one * math.exp(-1.0), rtol=1e-8)
