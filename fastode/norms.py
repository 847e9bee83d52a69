"""Norms for the error ratio (the ``norm`` option). Same definitions as torchdiffeq."""
from __future__ import annotations

import torch

__all__ = ["rms_norm", "max_norm", "mixed_norm", "zero_norm"]


def rms_norm(tensor: torch.Tensor) -> torch.Tensor:
    """sqrt(mean(|x|^2)) over every element (torchdiffeq's default ``_rms_norm``)."""
    return tensor.abs().pow(2).mean().sqrt()


def max_norm(tensor: torch.Tensor) -> torch.Tensor:
    """max |x| (torchdiffeq's ``_linf_norm``)."""
    return tensor.abs().max()


def zero_norm(tensor) -> float:
    """Always 0 (used to exclude components from a norm, e.g. adjoint seminorms)."""
    return 0.


def mixed_norm(tensor_tuple) -> torch.Tensor:
    """max over the tuple's components of their RMS norm (torchdiffeq's default for tuple states)."""
    if len(tensor_tuple) == 0:
        return 0.
    norms = [rms_norm(tensor) for tensor in tensor_tuple]
    if len(norms) == 1:
        return norms[0]
    return torch.stack(norms).max()  # no host sync (torchdiffeq's python max() syncs per comparison)
