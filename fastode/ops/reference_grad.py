"""Backward through the PyTorch reference, for double backward of the fused (Triton / C++) Functions.

The fused backward passes are first-order only. When a graph of the backward is requested
(``create_graph=True``), the Functions instead differentiate the reference implementation, so higher
derivatives are always available (at reference speed). Kept free of Triton and of the C++ extension so that
both backends can use it.
"""
from __future__ import annotations

import torch

__all__ = ["reference_backward"]


def reference_backward(ref_fn, inputs, grads, needs) -> tuple:
    """Local gradients of ``ref_fn(*inputs)`` (torch ops) with a graph, one entry per input (None where not
    needed or not a tensor).

    ``ref_fn`` is evaluated on aliases (views) of the inputs and differentiated w.r.t. the aliases, so that
    only the paths through the calling Function are counted (an input that depends on another input, e.g. a
    stage value computed from ``y0``, must not add its upstream path here), while the result stays a
    differentiable function of the original inputs.
    """
    with torch.enable_grad():
        inputs = [x.view_as(x) if isinstance(x, torch.Tensor) else x for x in inputs]
        outs = ref_fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        wanted = [i for i, (x, n) in enumerate(zip(inputs, needs)) if n and isinstance(x, torch.Tensor)]
        res = [None] * len(inputs)
        if pairs and wanted:
            got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                      create_graph=True, allow_unused=True)
            for i, g in zip(wanted, got):
                res[i] = g
    return tuple(res)
