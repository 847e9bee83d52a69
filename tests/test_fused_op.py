"""FusedOp (fastode/ops/fused_op.py): one declaration gives an eager autograd Function and a torch.library custom op
that agree with each other and with the analytic derivatives; the double backward goes through the reference.

A toy kernel stands in for a native one: ``(out, save) = (w * sum_i c_i x_i**2, x_0 * 2)`` over a list of tensors
``xs`` with float weights ``c`` and a tensor ``w`` (list inputs, non-tensor arguments, a saved output that carries
no gradient, a backward of its own). References: its closed-form derivatives (gradcheck / gradgradcheck in float64),
torch.library.opcheck, and a torch.compile graph that holds the op as one node.
"""
from typing import List, Tuple

import pytest
import torch

from fastode.ops.fused_op import FusedOp

Tensor = torch.Tensor
CALLS = {"forward": 0, "backward": 0}


def _forward(xs: List[Tensor], c: List[float], w: Tensor) -> Tuple[Tensor, Tensor]:
    CALLS["forward"] += 1
    acc = sum(ci * x * x for ci, x in zip(c, xs))
    return w * acc, (xs[0] * 2).detach()


def _backward(xs: List[Tensor], c: List[float], w: Tensor, g: Tensor, need_w: bool) -> Tuple[List[Tensor], Tensor]:
    CALLS["backward"] += 1
    gx = [2 * ci * w * x * g for ci, x in zip(c, xs)]
    gw = (g * sum(ci * x * x for ci, x in zip(c, xs))).sum().reshape(w.shape) if need_w else w.new_empty(0)
    return gx, gw


def _grads(args, extra, attrs, gouts, needs, backward):
    xs, c, w = args
    assert attrs == "attrs" and extra[0].shape == xs[0].shape  # what setup kept reaches the gradients
    need_w = bool(needs[2])
    gx, gw = backward(xs, c, w, gouts[0], need_w)
    if isinstance(needs[0], (list, tuple)):
        gx = [g if n else None for g, n in zip(gx, needs[0])]
    return gx, None, gw if need_w else None


SQUARES = FusedOp(
    "test_weighted_squares", forward=_forward, fake=lambda xs, c, w: (torch.empty_like(xs[0]), torch.empty_like(xs[0])),
    backward=_backward,
    backward_fake=lambda xs, c, w, g, need_w: ([torch.empty_like(x) for x in xs],
                                               torch.empty_like(w) if need_w else w.new_empty(0)),
    setup=lambda args, out: ([out[1]], "attrs"), grads=_grads,
    reference=lambda xs, c, w: (w * sum(ci * x * x for ci, x in zip(c, xs)),), non_differentiable=(1,))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    return xs, [0.5, -1.25, 2.0], w


def test_eager_runs_the_generated_function_and_matches_the_formula():
    xs, c, w = _inputs()
    before = dict(CALLS)
    out, save = SQUARES(xs, c, w)
    assert out.grad_fn is not None and "Fused_test_weighted_squares" in type(out.grad_fn).__name__
    assert not save.requires_grad  # the saved output carries no gradient
    torch.testing.assert_close(out, w * sum(ci * x * x for ci, x in zip(c, xs)), rtol=0, atol=0)
    gx = torch.autograd.grad(out.sum(), xs + [w])
    assert CALLS["forward"] == before["forward"] + 1 and CALLS["backward"] == before["backward"] + 1
    for ci, x, g in zip(c, xs, gx):
        torch.testing.assert_close(g, 2 * ci * w.detach() * x.detach(), rtol=1e-15, atol=0)


def test_gradcheck_and_gradgradcheck_eager():
    xs, c, w = _inputs(1)

    def f(x0, x1, x2, w):
        return SQUARES([x0, x1, x2], c, w)[0]

    assert torch.autograd.gradcheck(f, (*xs, w))
    assert torch.autograd.gradgradcheck(f, (*xs, w))  # through the reference


def test_only_the_needed_gradients_are_formed():
    xs, c, w = _inputs(2)
    xs[1] = xs[1].detach()
    out, _ = SQUARES(xs, c, w.detach())
    g = torch.autograd.grad(out.sum(), [xs[0], xs[2]])
    torch.testing.assert_close(g[0], 2 * c[0] * w.detach() * xs[0].detach())


def test_the_custom_op_agrees_and_passes_opcheck():
    xs, c, w = _inputs(3)
    torch.library.opcheck(SQUARES.op, (xs, c, w))
    op_out = SQUARES.op(xs, c, w)
    fn_out = SQUARES(xs, c, w)
    torch.testing.assert_close(op_out[0], fn_out[0], rtol=0, atol=0)
    g_op = torch.autograd.grad(op_out[0].sum(), xs + [w])
    g_fn = torch.autograd.grad(fn_out[0].sum(), xs + [w])
    for a, b in zip(g_op, g_fn):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
    assert torch.autograd.gradgradcheck(lambda a, b, cc, ww: SQUARES.op([a, b, cc], c, ww)[0], (*xs, w))


def test_a_compiled_graph_holds_one_node_of_it():
    xs, c, w = _inputs(4)
    nodes = []

    def backend(gm, example_inputs):
        nodes.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    fn = torch.compile(lambda x0, x1, x2, w: SQUARES([x0, x1, x2], c, w)[0].sum(), backend=backend, fullgraph=True)
    args = [x.detach() for x in xs] + [w.detach()]
    got = fn(*args)
    torch.testing.assert_close(got, SQUARES([x.detach() for x in xs], c, w.detach())[0].sum())
    assert sum("test_weighted_squares" in n for n in nodes) == 1


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
