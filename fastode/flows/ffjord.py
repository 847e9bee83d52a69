"""Load checkpoints written by FFJORD's and RNODE's public training scripts into fastode flows.

Those scripts save ``torch.save({"args": args, "state_dict": model.state_dict()}, "checkpt.pth")``: a
``SequentialFlow`` whose ``chain`` holds CNF blocks (each an ``ODEfunc`` around an ``ODEnet`` of concatsquash layers,
wrapped in a ``RegularizedODEfunc`` when regularisers were trained, with the end time stored as ``sqrt_end_time``)
and, with ``--batch_norm True``, ``MovingBatchNorm1d`` layers before the first block and after every block.
:func:`load_ffjord` rebuilds that model as a :class:`~fastode.flows.SequentialFlow` of :class:`~fastode.flows.CNF` and
:class:`~fastode.flows.MovingBatchNorm1d` blocks with the same parameters, so that it gives the same log-likelihood and
samples (to float32 rounding; fastode's solvers take torchdiffeq's steps), and then trains, evaluates, compiles and
exports as any fastode flow.

Convert once from the command line (the result loads with ``torch.load(..., weights_only=False)``)::

    python -m fastode.flows.ffjord checkpt.pth flow.pt

What is carried over: the network (concatsquash layers, the activation), the end time and whether it is learned, the
batch normalisation layers and their running statistics, the training and test solvers (method, tolerances,
``step_size``), the trace estimator (``divergence_fn``, ``rademacher``). Evaluation uses the exact trace, as those
scripts' final evaluation does (and as their evaluation of 2-D data always does). The regularisers the model was
trained with are not carried over (they do not enter the density); give the flow its own to continue training.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Optional

import torch

from ..ops.concatsquash import ACTIVATIONS
from ..solvers import SOLVERS
from .batchnorm import MovingBatchNorm1d
from .cnf import CNF, SequentialFlow

__all__ = ["load_ffjord", "SUPPORTED"]

SUPPORTED = ("CNF blocks whose ODEnet is made of concatsquash linear layers (layer_type 'concatsquash'; activations "
             f"{', '.join(ACTIVATIONS)}; swish with its beta at 1), and MovingBatchNorm1d layers")

_LAYER_KEYS = {"_layer.weight", "_layer.bias", "_hyper_bias.weight", "_hyper_gate.weight", "_hyper_gate.bias"}


def load_ffjord(source, *, activation: Optional[str] = None, map_location="cpu", nn_backend: str = "auto"):
    """A :class:`~fastode.flows.SequentialFlow` from an FFJORD / RNODE checkpoint.

    ``source``: a path to a ``checkpt.pth``, or the loaded dict (``{"args": ..., "state_dict": ...}``, or a bare
    state dict). ``activation``: the ODEnets' nonlinearity when the checkpoint's ``args`` do not say it (FFJORD's
    default is ``"softplus"``, its toy script's ``"tanh"``). The flow comes back in evaluation mode, in the
    checkpoint's dtype. Raises ``ValueError`` naming the layer for anything outside :data:`SUPPORTED`.
    """
    ckpt = _read(source, map_location)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError("not an FFJORD checkpoint: expected {'args': ..., 'state_dict': ...} or a state dict")
    args = _arguments(ckpt.get("args") if "state_dict" in ckpt else None)
    entries = _chain_entries(state)
    blocks = []
    for i in sorted(entries):
        keys = entries[i]
        if "sqrt_end_time" in keys:
            blocks.append(_cnf_block(i, keys, args, activation, nn_backend))
        elif "running_mean" in keys:
            blocks.append(_batch_norm(i, keys, args))
        else:
            raise ValueError(f"chain.{i}: a layer with parameters {sorted(keys)} is not supported; load_ffjord reads "
                             f"{SUPPORTED}")
    if not any(isinstance(b, CNF) for b in blocks):
        raise ValueError("the checkpoint holds no CNF block (no chain.<i>.sqrt_end_time)")
    flow = SequentialFlow(blocks, carry_logdet=True)  # FFJORD's chain carries the log-density through its blocks
    dtype = next(iter(state.values())).dtype
    return flow.to(dtype=dtype if dtype.is_floating_point else torch.get_default_dtype()).eval()


def _read(source, map_location):
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, os.PathLike)):
        # the scripts pickle their argparse Namespace with the weights: a full unpickling (trusted files only)
        return torch.load(source, map_location=map_location, weights_only=False)
    raise TypeError(f"source must be a path or a checkpoint dict, got {type(source).__name__}")


def _arguments(args) -> dict:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return dict(args)
    return {k: getattr(args, k) for k in dir(args) if not k.startswith("_")}


def _chain_entries(state: dict) -> dict:
    """``{i: {key below chain.<i>.: tensor}}``; anything not under ``chain.`` is not an FFJORD flow."""
    out: dict = defaultdict(dict)
    for key, value in state.items():
        parts = key.split(".", 2)
        if len(parts) < 3 or parts[0] != "chain" or not parts[1].isdigit():
            raise ValueError(f"not an FFJORD SequentialFlow state dict: key {key!r} is not under 'chain.<i>.'")
        out[int(parts[1])][parts[2]] = value
    return out


def _cnf_block(i: int, keys: dict, args: dict, activation: Optional[str], nn_backend: str) -> CNF:
    from fastode.nn import ConcatSquashMLP

    prefix = next((p for p in ("odefunc.odefunc.diffeq.", "odefunc.diffeq.") if any(k.startswith(p) for k in keys)),
                  None)
    if prefix is None:
        raise ValueError(f"chain.{i}: a CNF block without an ODEnet ('odefunc.diffeq.'); load_ffjord reads {SUPPORTED}")
    if args.get("residual"):
        raise ValueError(f"chain.{i}: residual=True ODEfuncs (f - y) are not supported; load_ffjord reads {SUPPORTED}")
    net = {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}
    layers: dict = defaultdict(dict)
    betas = {}
    for k, v in net.items():
        parts = k.split(".", 2)
        if parts[0] == "layers" and len(parts) == 3:
            layers[int(parts[1])][parts[2]] = v
        elif parts[0] == "activation_fns" and len(parts) == 3 and parts[2] == "beta":
            betas[int(parts[1])] = float(v)
        else:
            raise ValueError(f"chain.{i}: ODEnet parameter {k!r} is not supported; load_ffjord reads {SUPPORTED}")
    kind = args.get("layer_type", "concatsquash")
    widths = []
    for n in range(len(layers)):
        got = set(layers.get(n, {}))
        if got != _LAYER_KEYS or kind != "concatsquash":
            raise ValueError(f"chain.{i}: ODEnet layer {n} is a {kind!r} layer (parameters {sorted(got)}); load_ffjord "
                             f"reads {SUPPORTED}")
        W = layers[n]["_layer.weight"]
        if W.dim() != 2:
            raise ValueError(f"chain.{i}: ODEnet layer {n} is convolutional (weight of shape {tuple(W.shape)}); "
                             f"load_ffjord reads {SUPPORTED}")
        widths.append((W.shape[1], W.shape[0]))
    dim = widths[0][0]
    if widths[-1][1] != dim or any(a[1] != b[0] for a, b in zip(widths, widths[1:])):
        raise ValueError(f"chain.{i}: the ODEnet's layer shapes {widths} do not chain from {dim} back to {dim}")
    act = args.get("nonlinearity") or activation
    if act is None:
        raise ValueError(f"chain.{i}: the checkpoint does not say the ODEnet's nonlinearity; pass activation=...")
    if act not in ACTIVATIONS:
        raise ValueError(f"chain.{i}: nonlinearity {act!r} is not supported; load_ffjord reads {SUPPORTED}")
    if act == "swish" and any(abs(b - 1.0) > 0 for b in betas.values()):
        raise ValueError(f"chain.{i}: swish with a learned beta {sorted(set(betas.values()))}; fastode's swish has "
                         "beta 1")
    dtype = layers[0]["_layer.weight"].dtype  # built in the checkpoint's dtype: loading casts into the module's
    dyn = ConcatSquashMLP(dim, tuple(w[1] for w in widths[:-1]), act, backend=nn_backend,
                          noise="rademacher" if args.get("rademacher") else "gaussian").to(dtype)
    dyn.load_state_dict({f"layers.{n}.{k}": v for n, layer in layers.items() for k, v in layer.items()})
    s = float(keys["sqrt_end_time"])
    method = args.get("solver", "dopri5")
    if method not in SOLVERS:
        raise ValueError(f"chain.{i}: solver {method!r} is not one of fastode's methods; choose one of "
                         f"{sorted(SOLVERS)} with cnf.set_train_solver(...) after loading")
    trace = "exact" if args.get("divergence_fn") == "brute_force" else "hutchinson"
    cnf = CNF(dyn, T=s * s, learn_T=bool(args.get("train_T", True)), T_parametrization="sqrt", trace=trace,
              eval_trace="exact", noise="rademacher" if args.get("rademacher") else "gaussian", method=method,
              rtol=float(args.get("rtol", 1e-5)), atol=float(args.get("atol", 1e-5)),
              step_size=args.get("step_size")).to(dtype)
    test_method = args.get("test_solver") or method
    if test_method not in SOLVERS:
        raise ValueError(f"chain.{i}: test solver {test_method!r} is not one of fastode's methods")
    cnf.set_eval_solver(test_method, rtol=float(args.get("test_rtol") or cnf.train_solver.rtol),
                        atol=float(args.get("test_atol") or cnf.train_solver.atol))
    with torch.no_grad():
        cnf._T_raw.fill_(s if cnf.T_parametrization == "sqrt" else s * s)  # the stored value itself, not sqrt(s^2)
    return cnf


def _batch_norm(i: int, keys: dict, args: dict) -> MovingBatchNorm1d:
    expected = {"step", "running_mean", "running_var", "weight", "bias"}
    affine = "weight" in keys
    if set(keys) != (expected if affine else expected - {"weight", "bias"}):
        raise ValueError(f"chain.{i}: a normalisation layer with parameters {sorted(keys)} is not supported; "
                         f"load_ffjord reads {SUPPORTED}")
    bn = MovingBatchNorm1d(keys["running_mean"].numel(), bn_lag=float(args.get("bn_lag", 0.0) or 0.0), affine=affine)
    bn.to(keys["running_mean"].dtype).load_state_dict(keys)  # in the checkpoint's dtype: loading casts into ours
    return bn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastode.flows.ffjord",
                                 description="Convert an FFJORD / RNODE checkpoint into a fastode flow (torch.save of "
                                             "the module; load it with torch.load(path, weights_only=False)).")
    ap.add_argument("checkpoint", help="the checkpt.pth written by FFJORD's or RNODE's training script")
    ap.add_argument("output", help="where to write the fastode flow")
    ap.add_argument("--activation", help="the ODEnets' nonlinearity when the checkpoint's args do not say it")
    args = ap.parse_args(argv)
    flow = load_ffjord(args.checkpoint, activation=args.activation)
    torch.save(flow, args.output)
    blocks = ", ".join(type(b).__name__ for b in flow.blocks)
    print(f"wrote {args.output}: SequentialFlow of {blocks}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
