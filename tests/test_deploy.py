"""Deploying a trained flow (fastode/flows/deploy.py): DeployedFlow gives what the flow gives with the same fixed-grid
evaluation solver, exports whole with torch.export (strict and non-strict) and to ONNX, and ONNX Runtime gives the
same log-likelihood and samples (to float32 rounding).

References: the flow itself (``flow.using_solver("rk4", step_size=T / steps)``: the fastode solve, checked against
torchdiffeq elsewhere) and the eager DeployedFlow for the exported programs. Tiny models (one block, a few steps):
the ONNX exporter takes seconds per graph.
"""
import pytest
import torch

from fastode.flows import CNF, DeployedFlow, MovingBatchNorm1d, SequentialFlow, build_flow, export_flow
from fastode.nn import ConcatSquashMLP


def _flow(dtype=torch.float32, bn=False):
    torch.manual_seed(0)
    cnf = CNF(ConcatSquashMLP(2, (12,), "tanh"), T=0.4, learn_T=True, method="dopri5")
    blocks = [MovingBatchNorm1d(2), cnf] if bn else [cnf]
    flow = SequentialFlow(blocks).to(dtype).eval()
    with torch.no_grad():
        if bn:
            blocks[0].running_mean.copy_(torch.tensor([0.3, -0.2]))
            blocks[0].running_var.copy_(torch.tensor([1.5, 0.7]))
            blocks[0].weight.copy_(torch.tensor([0.1, -0.2]))
    return flow


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bn", [False, True])
def test_it_gives_the_flows_fixed_grid_log_prob_and_samples(dtype, bn):
    flow = _flow(dtype, bn)
    x = torch.randn(9, 2, dtype=dtype, generator=torch.Generator().manual_seed(1))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad(), flow.using_solver("rk4", step_size=0.1):
        want_lp, want_x = flow.log_prob(x), flow.sample(9, z=x)
    with torch.no_grad():
        torch.testing.assert_close(DeployedFlow(flow, "log_prob", "rk4", steps=4)(x), want_lp, **tol)
        torch.testing.assert_close(DeployedFlow(flow, "sample", "rk4", step_size=0.1)(x), want_x, **tol)


def test_an_adaptive_method_says_it_cannot_be_exported():
    with pytest.raises(ValueError, match=r"adaptive solve.*fixed-grid method"):
        DeployedFlow(_flow(), method="dopri5")
    with pytest.raises(ValueError, match="plain ConcatSquashMLP"):
        DeployedFlow(build_flow(2, hidden=(4,), time_varying=2), method="rk4")


@pytest.mark.parametrize("strict", [True, False])
def test_torch_export_takes_it_whole(strict, tmp_path):
    flow = _flow(bn=True)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    path = tmp_path / f"flow_{strict}.pt2"
    export_flow(flow, path, "log_prob", "rk4", steps=2, strict=strict)
    program = torch.export.load(str(path))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("fastode" in t for t in targets)  # standard operators only
    x7 = torch.randn(7, 2, generator=torch.Generator().manual_seed(3))  # another batch size: the batch is dynamic
    with torch.no_grad():
        for xx in (x, x7):
            torch.testing.assert_close(program.module()(xx), DeployedFlow(flow, "log_prob", "rk4", steps=2)(xx))


@pytest.mark.parametrize("what", ["log_prob", "sample"])
def test_onnx_runtime_gives_the_same_numbers(what, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    flow = _flow(bn=True)
    path = tmp_path / f"{what}.onnx"
    export_flow(flow, path, what, "rk4", steps=2)
    session = ort.InferenceSession(str(path))
    x = torch.randn(11, 2, generator=torch.Generator().manual_seed(4))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad(), flow.using_solver("rk4", step_size=0.2):
        want = flow.log_prob(x) if what == "log_prob" else flow.sample(11, z=x)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
