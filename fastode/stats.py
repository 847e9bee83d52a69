"""Solver statistics (``odeint(..., return_stats=True)``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

__all__ = ["SolveStats"]


@dataclass
class SolveStats:
    """What a solve cost and which steps it took.

    Attributes:
        num_fevals: evaluations of ``func`` in the forward solve (same count as torchdiffeq's NFE).
        num_steps: step attempts (accepted + rejected). Fixed-grid solvers: grid steps.
        num_accepted_steps: accepted steps.
        num_rejected_steps: rejected steps (adaptive solvers only).
        num_fevals_backward: evaluations of ``func`` (or of its VJP) during the backward pass, filled in by
            ``gradient="checkpoint"`` / ``"adjoint"`` when backward runs (0 for ``"direct"``).
        step_ts: start time of every accepted step, in the user's time orientation (float64, host list).
        step_sizes: signed size of every accepted step in the user's time orientation (float64, host list).
        step_errors: per-accepted-step error ratio ``norm(err / (atol + rtol * max(|y0|, |y1|)))`` as 0-dim
            tensors in the state's real dtype. With ``gradient="direct"`` they are differentiable w.r.t. the
            state and the parameters of ``func`` (used by global error regularisers); empty for fixed-grid
            methods (no error estimate).
        method: name of the method that produced these statistics.
    """

    num_fevals: int = 0
    num_steps: int = 0
    num_accepted_steps: int = 0
    num_rejected_steps: int = 0
    num_fevals_backward: int = 0
    step_ts: List[float] = field(default_factory=list)
    step_sizes: List[float] = field(default_factory=list)
    step_errors: List[torch.Tensor] = field(default_factory=list)
    method: Optional[str] = None

    def total_step_error(self) -> torch.Tensor:
        """Sum of ``step_errors`` (0-dim tensor; ``0.`` when empty)."""
        if not self.step_errors:
            return torch.zeros(())
        return torch.stack([e.reshape(()) for e in self.step_errors]).sum()
