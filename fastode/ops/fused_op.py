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

``op(*args)`` runs the custom op when compiling and the Function otherwise.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .reference_grad import reference_backward

__all__ = ["FusedOp"]


class _Layout:
    """Where each argument of a call sits among the Function's positional inputs (a list argument is spread)."""

    __slots__ = ("kinds",)

    def __init__(self, args):
        self.kinds = tuple(len(a) if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)
                           else (-1 if isinstance(a, (list, tuple)) else None) for a in args)

    def flatten(self, args) -> list:
        flat = []
        for a, k in zip(args, self.kinds):
            if k is None or k < 0:
                flat.append(a)
            else:
                flat.extend(a)
        return flat

    def unflatten(self, flat) -> list:
        out, i = [], 0
        for k in self.kinds:
            if k is None or k < 0:
                out.append(flat[i])
                i += 1
            else:
                out.append(list(flat[i:i + k]))
                i += k
        return out

    def spread(self, grads) -> list:
        """Per-argument gradients (a list argument's: a list or None) as the Function's per-input gradients."""
        flat = []
        for g, k in zip(grads, self.kinds):
            if k is None or k < 0:
                flat.append(g)
            else:
                flat.extend(g if g is not None else [None] * k)
        return flat


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
        layout = _Layout(args)
        return self.function.apply(self, layout, *layout.flatten(args))

    # ---- the custom op's autograd (what a compiled graph differentiates): through the backward op
    def _op_setup(self, ctx, inputs, output):
        args = list(inputs)
        extra, ctx.attrs = self.setup(args, output)
        _save(ctx, _Layout(args), args, extra)

    def _op_backward(self, ctx, *grad_outputs):
        args, extra = _restore(ctx)
        if torch.is_grad_enabled() and self.reference is not None:  # a graph of the backward: through the spec
            layout = ctx.layout  # (a list input has one need: every entry takes it)
            needs = layout.flatten([[bool(n)] * k if k is not None and k >= 0 else bool(n)
                                    for n, k in zip(ctx.needs_input_grad, layout.kinds)])
            return tuple(layout.unflatten(_reference_grads(self, layout, args, grad_outputs, needs)))
        needs = [bool(n) for n in ctx.needs_input_grad]
        return tuple(self.grads(args, extra, ctx.attrs, grad_outputs, needs, self.backward_op))


def _save(ctx, layout: _Layout, args: list, extra) -> None:
    """Keep the call's tensor inputs and ``extra`` (the rest of the arguments as they are) for the backward."""
    flat = layout.flatten(args)
    at = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    ctx.save_for_backward(*(flat[i] for i in at), *extra)
    ctx.layout, ctx.tensor_at, ctx.flat = layout, at, [None if isinstance(x, torch.Tensor) else x for x in flat]


def _restore(ctx) -> tuple:
    """``(args, extra)`` as :func:`_save` kept them."""
    saved = ctx.saved_tensors
    flat = list(ctx.flat)
    for i, x in zip(ctx.tensor_at, saved):
        flat[i] = x
    return ctx.layout.unflatten(flat), list(saved[len(ctx.tensor_at):])


def _function(op: FusedOp):
    """The eager autograd Function of ``op`` (class ``Fused_<name>``, so that autograd graphs and profiles name it):
    the same forward and backward implementations, called directly."""

    def forward(ctx, op_, layout, *flat):
        args = layout.unflatten(flat)
        outputs = op_.forward(*args)
        extra, ctx.attrs = op_.setup(args, outputs)
        _save(ctx, layout, args, extra)
        ctx.op = op_
        ctx.set_materialize_grads(False)
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
    op_, layout = ctx.op, ctx.layout
    args, extra = _restore(ctx)
    needs = layout.unflatten(ctx.needs_input_grad[2:])
    if torch.is_grad_enabled() and op_.reference is not None:  # create_graph=True: through the spec
        return (None, None) + _reference_grads(op_, layout, args, grad_outputs, ctx.needs_input_grad[2:])
    if all(g is None for g in grad_outputs):
        return (None,) * len(ctx.needs_input_grad)
    grads = op_.grads(args, extra, ctx.attrs, grad_outputs, needs, op_.backward)
    return (None, None) + tuple(layout.spread(grads))


def _reference_grads(op: FusedOp, layout: _Layout, args: list, grad_outputs, needs) -> tuple:
    """A differentiable backward: the reference formula's vector-Jacobian product at the inputs."""
    flat = layout.flatten(args)
    at = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]

    def ref(*tensors):
        full = list(flat)
        for i, x in zip(at, tensors):
            full[i] = x
        return op.reference(*layout.unflatten(full))

    which = op.differentiable_outputs
    gouts = tuple(grad_outputs[i] for i in (which(args) if callable(which) else which))
    g = reference_backward(ref, [flat[i] for i in at], gouts, [needs[i] for i in at])
    out = [None] * len(flat)
    for i, gi in zip(at, g):
        out[i] = gi
    return tuple(out)
