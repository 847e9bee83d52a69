"""Declare a fused kernel once: its eager autograd Function, its ``torch.library`` custom op (with the fake and the
autograd registration a compiled graph needs) and the switch between them are generated from one declaration.

Why two forms: an eager call through an autograd Function costs a few microseconds and keeps a double backward
(through the spec); ``torch.compile`` cannot trace into a launcher or a pybind11 call, so a compiled graph needs the
same kernel as one custom op node. Both forms run the same two implementation functions, so they cannot drift apart.

A declaration (:class:`FusedOp`) names:

* ``forward(*args) -> outputs``: the kernel call, annotated as a custom op's body (``Tensor``, ``Optional[Tensor]``,
  ``List[Tensor]``, numbers, ``bool``, ``str``; outputs a tuple of tensors or lists of tensors); an output a call
  does not produce is an empty tensor;
* ``fake(*args) -> outputs``: their shapes, for tracing;
* ``backward(...) -> tuple``: the backward kernel call, annotated likewise (it becomes the custom op
  ``<name>_backward``), with its ``backward_fake``;
* ``setup(args, outputs) -> (extra tensors to save, attributes)``: what the backward needs besides the inputs (which
  are always kept): saved activations among the outputs, settings;
* ``grads(args, extra, attrs, grad_outputs, needs, backward) -> one gradient per input``: ``args`` the call's
  arguments, ``needs`` per input a bool (for a list input: a bool, or one per entry), ``backward`` the backward
  implementation to call (the custom op when compiled, the function itself eagerly); a list input's gradient is a
  list or None;
* ``reference(*args) -> differentiable outputs`` (optional): the spec's formula, differentiated instead when a
  backward runs with ``create_graph=True`` (a double backward, e.g. FFJORD's exact trace of a trace); without it the
  eager backward is once differentiable. ``differentiable_outputs``: the outputs the reference returns, in order
  (or a function of the arguments giving them);
* ``non_differentiable``: the indices of outputs that carry no gradient (saved activations, maxima).

``op(*args)`` runs the custom op when compiling, the kernel call itself when no graph is recorded (grad mode off),
and the Function otherwise. ``op.op`` / ``op.backward_op`` are the custom ops (for ``torch.library.opcheck``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .reference_grad import reference_backward

__all__ = ["FusedOp", "any_need", "masked_grads"]


def any_need(needs) -> bool:
    """Whether a list input needs any gradient (``needs``: one bool per entry eagerly, one for the list compiled)."""
    return any(needs) if isinstance(needs, (list, tuple)) else bool(needs)


def masked_grads(grads, needs):
    """A list input's gradients as ``needs`` asks (per entry eagerly, all or none compiled), None for none."""
    if isinstance(needs, (list, tuple)):
        return [g if n else None for g, n in zip(grads, needs)] if any(needs) else None
    return list(grads) if needs else None


class _Layout:
    """How a call's arguments map to the Function's positional tensor inputs: a tensor (or None) takes one place, a
    list of tensors is spread (its length kept), anything else (numbers, strings, lists of numbers) is a constant
    kept here. Built in one pass over the arguments per call (the eager path runs per stage)."""

    __slots__ = ("kinds", "consts")

    def __init__(self, kinds, consts):
        self.kinds, self.consts = kinds, consts

    @staticmethod
    def of(args) -> tuple:
        """``(layout, tensors)`` of a call's arguments."""
        kinds, tensors, consts = [], [], []
        for a in args:
            if a is None or isinstance(a, torch.Tensor):
                kinds.append(-1)
                tensors.append(a)
            elif type(a) is list and a and isinstance(a[0], torch.Tensor):
                kinds.append(len(a))
                tensors.extend(a)
            else:
                kinds.append(-2)
                consts.append(a)
        return _Layout(kinds, consts), tensors

    def args(self, tensors, const=None) -> list:
        """The call's arguments from its tensor inputs (``const``: what a constant argument becomes instead of
        itself, e.g. False for its need of a gradient)."""
        out, i, j = [], 0, 0
        for k in self.kinds:
            if k == -1:
                out.append(tensors[i])
                i += 1
            elif k >= 0:
                out.append(list(tensors[i:i + k]))
                i += k
            else:
                out.append(self.consts[j] if const is None else const)
                j += 1
        return out

    def spread(self, per_arg) -> list:
        """Per-argument gradients (a list argument's: a list, or None for all its entries) as per-tensor ones."""
        flat = []
        for g, k in zip(per_arg, self.kinds):
            if k == -1:
                flat.append(g)
            elif k >= 0:
                flat.extend(g if g is not None else (None,) * k)
        return flat

    def gather(self, per_tensor) -> list:
        """Per-tensor gradients as per-argument ones (a list argument's: a list, or None when all are None)."""
        out, i = [], 0
        for k in self.kinds:
            if k == -1:
                out.append(per_tensor[i])
                i += 1
            elif k >= 0:
                g = list(per_tensor[i:i + k])
                out.append(None if all(x is None for x in g) else g)
                i += k
            else:
                out.append(None)
        return out


class FusedOp:
    """One fused kernel, declared once (see the module docstring)."""

    def __init__(self, name: str, *, forward: Callable, fake: Callable, backward: Callable, backward_fake: Callable,
                 setup: Callable, grads: Callable, reference: Optional[Callable] = None,
                 differentiable_outputs: Sequence[int] | Callable = (0,), non_differentiable: Sequence[int] = ()):
        self.name = name
        self.forward, self.backward, self.setup, self.grads = forward, backward, setup, grads
        self.reference = reference
        self.differentiable_outputs = differentiable_outputs
        self.non_differentiable = tuple(non_differentiable)
        self.op = torch.library.custom_op(f"fastode::{name}", mutates_args=())(forward)
        self.op.register_fake(fake)
        self.backward_op = torch.library.custom_op(f"fastode::{name}_backward", mutates_args=())(backward)
        self.backward_op.register_fake(backward_fake)
        torch.library.register_autograd(f"fastode::{name}", self._op_backward, setup_context=self._op_setup)
        self.function = _function(self)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        if not torch.is_grad_enabled():  # no graph to record: the kernel call itself
            return self.forward(*args)
        layout, tensors = _Layout.of(args)
        return self.function.apply(self, layout, *tensors)

    # ---- the custom op's autograd (what a compiled graph differentiates): through the backward op
    def _op_setup(self, ctx, inputs, output):
        layout, tensors = _Layout.of(list(inputs))
        extra, ctx.attrs = self.setup(layout.args(tensors), output)
        ctx.save_for_backward(*tensors, *extra)
        ctx.layout, ctx.n_inputs = layout, len(tensors)

    def _op_backward(self, ctx, *grad_outputs):
        layout, saved = ctx.layout, ctx.saved_tensors
        tensors, extra = saved[:ctx.n_inputs], list(saved[ctx.n_inputs:])
        args = layout.args(tensors)
        if torch.is_grad_enabled() and self.reference is not None:  # a graph of the backward: through the spec
            needs = layout.spread([[bool(n)] * k if k >= 0 else bool(n)  # (a list input has one need for all)
                                   for n, k in zip(ctx.needs_input_grad, layout.kinds)])
            return tuple(layout.gather(_reference_grads(self, layout, tensors, args, grad_outputs, needs)))
        needs = [bool(n) for n in ctx.needs_input_grad]
        return tuple(self.grads(args, extra, ctx.attrs, grad_outputs, needs, self.backward_op))


def _function(op: FusedOp):
    """The eager autograd Function of ``op`` (class ``Fused_<name>``, so that autograd graphs and profiles name it):
    the same forward and backward implementations, called directly."""

    def forward(ctx, op_, layout, *tensors):
        args = layout.args(tensors)
        outputs = op_.forward(*args)
        extra, ctx.attrs = op_.setup(args, outputs)
        ctx.save_for_backward(*tensors, *extra)
        ctx.op, ctx.layout, ctx.n_inputs = op_, layout, len(tensors)
        ctx.set_materialize_grads(False)
        if op_.non_differentiable:
            ctx.mark_non_differentiable(*(outputs[i] for i in op_.non_differentiable))
        return outputs

    def backward(ctx, *grad_outputs):
        return _backward(ctx, grad_outputs)

    if op.reference is None:  # without the spec's formula the fused backward is once differentiable
        backward = torch.autograd.function.once_differentiable(backward)
    return type(f"Fused_{op.name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def _backward(ctx, grad_outputs) -> tuple:
    """The eager Function's backward: the op's backward implementation, or the spec's when a graph is wanted."""
    if all(g is None for g in grad_outputs):
        return (None,) * len(ctx.needs_input_grad)
    op_, layout, saved = ctx.op, ctx.layout, ctx.saved_tensors
    tensors, extra = saved[:ctx.n_inputs], list(saved[ctx.n_inputs:])
    args = layout.args(tensors)
    needs = ctx.needs_input_grad[2:]
    if torch.is_grad_enabled() and op_.reference is not None:  # create_graph=True: through the spec
        return (None, None) + _reference_grads(op_, layout, tensors, args, grad_outputs, needs)
    grads = op_.grads(args, extra, ctx.attrs, grad_outputs, layout.args(needs, const=False), op_.backward)
    return (None, None) + tuple(layout.spread(grads))


def _reference_grads(op: FusedOp, layout: _Layout, tensors, args: list, grad_outputs, needs) -> tuple:
    """A differentiable backward: the reference formula's vector-Jacobian product at the inputs (one gradient per
    tensor input)."""
    which = op.differentiable_outputs
    gouts = tuple(grad_outputs[i] for i in (which(args) if callable(which) else which))
    return reference_backward(lambda *ts: op.reference(*layout.args(ts)), list(tensors), gouts, list(needs))
