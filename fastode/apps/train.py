"""Train a CNF density model: ``python -m fastode.train ...`` or ``fastode train ...``.

Examples::

    # FFJORD's toy setting (64-64-64 concatsquash, tanh, dopri5 1e-5, learned T = 0.5), with plots
    fastode train --data 8gaussians --niters 2000 --save runs/8g

    # Disc-Opt (Onken & Ruthotto): RK4 with h = 0.05, RNODE regularisers, exact-trace dopri5 evaluation
    # (--trace hutchinson: the fused CPU path takes RNODE's Jacobian-Frobenius term only with the probe trace)
    fastode train --data moons --method rk4 --step-size 0.05 --trace hutchinson --kinetic 0.01 \\
        --jacobian-frobenius 0.01 --eval-method dopri5 --eval-atol 1e-5 --eval-rtol 1e-5 --save runs/moons-do

    # tabular data with early stopping, resumable
    fastode train --data digits --dims 256-256 --activation softplus --batch-size 256 --niters 20000 \\
        --val-every 200 --patience 30 --save runs/digits --resume auto

    # two processes, data parallel (gloo on CPU, nccl on GPU); --batch-size is the global batch
    torchrun --nproc-per-node 2 -m fastode.train --data 8gaussians --batch-size 200 --save runs/ddp

Everything the run did ends up in ``<save>/``: ``report.json`` (test NLL with the exact trace in nats, bits/dim
for image data, train/eval NFE, time per iteration, inverse error, the configuration, versions),
``checkpoint.pt`` (latest; resume with ``--resume auto``), ``best.pt`` (best validation), and for 2-D data
``density.png``, ``trajectory.png``, plus ``curves.png``.

Reproducibility: the training batch and the Hutchinson noise of iteration ``i`` on process ``r`` are pure
functions of ``(--seed, r, i)``, so a resumed run continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Sequence

import numpy as np
import torch

__all__ = ["build_parser", "parse_args", "main", "train", "build_model", "DistInfo", "init_distributed",
           "BatchSource", "evaluate_nll", "wrap_for_training"]

ACTIVATION_CHOICES = ("tanh", "softplus", "elu", "swish", "identity")
GRADIENT_CHOICES = ("direct", "checkpoint", "adjoint")
T_MODES = ("fixed", "ffjord", "joint", "alternate")


# ---------------------------------------------------------------------------------------------------------
# command line

def _dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in str(text).replace(",", "-").split("-") if d != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dims must look like 64-64-64, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"--dims needs positive layer widths, got {text!r}")
    return dims


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


class UsageError(ValueError):
    """A mistake in the command line or its files: ``main`` prints it as one line (no traceback), exit 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` once: not for options without a default, nor where the help text already says
    what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, argparse.SUPPRESS) or "default" in text or not action.option_strings
                or isinstance(action, argparse._HelpAction)):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Reports a mistake in one line (the full usage of ~40 options would bury it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _method_names() -> list:
    from fastode.solvers import SOLVERS

    return list(SOLVERS)


def _method(text: str) -> str:
    """``--method`` / ``--eval-method``: a fastode method name, with a "did you mean" for near misses."""
    from fastode.solvers import SOLVERS, suggest_method

    if text in SOLVERS:
        return text
    close = suggest_method(text)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise argparse.ArgumentTypeError(f"unknown method {text!r}{hint} (valid: {', '.join(SOLVERS)})")


#: step size used when a fixed-grid method is given without --step-size (Disc-Opt's h for T = 0.5: 10 steps)
DEFAULT_FIXED_STEP = 0.05


def build_parser() -> argparse.ArgumentParser:
    from fastode.data import DATASETS

    p = _Parser(
        prog="fastode train", description="Train a continuous normalizing flow (FFJORD-style CNF) with fastode.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="8gaussians", choices=DATASETS, help="2-D toy density or tabular dataset")
    g.add_argument("--data-root", default=None,
                   help="directory with the MAF data files (miniboone/, power/, gas/, hepmass/, BSDS300/); "
                        "default $FASTODE_DATA_ROOT or ./data")
    g.add_argument("--data-seed", type=int, default=42, help="seed of the shuffle / dequantisation of sklearn sets")
    g.add_argument("--digits-transform", default="standardize", choices=("standardize", "logit"),
                   help="preprocessing of the digits pixels")
    g.add_argument("--toy-val-size", type=int, default=1000, help="fixed validation set size (toy data)")
    g.add_argument("--toy-test-size", type=int, default=5000, help="fixed test set size (toy data)")

    g = p.add_argument_group("model")
    g.add_argument("--dims", type=_dims, default="64-64-64", help="hidden widths of the concatsquash MLP")
    g.add_argument("--activation", default="tanh", choices=ACTIVATION_CHOICES, help="MLP activation")
    g.add_argument("--num-blocks", type=int, default=1, help="stacked CNF blocks")
    g.add_argument("--time-varying", type=int, default=None, metavar="K",
                   help="Disc-Opt time-varying weights on K control times (default: FFJORD's time-conditioned MLP)")
    g.add_argument("--nn-backend", default="auto", choices=("auto", "torch", "cpp", "triton"),
                   help="concatsquash MLP implementation")
    g.add_argument("--trace", default=None, choices=("hutchinson", "exact"),
                   help="training divergence (default: exact for 2-D data as FFJORD's toys, else hutchinson)")
    g.add_argument("--noise", default="gaussian", choices=("gaussian", "rademacher"), help="Hutchinson probes")

    g = p.add_argument_group("end time T")
    g.add_argument("--T", type=float, default=None, help="integration end time (default 0.5 for toy, 1.0 tabular)")
    g.add_argument("--T-mode", default="ffjord", choices=T_MODES,
                   help="fixed: T constant; ffjord: T = s^2 learned jointly by the main optimizer (FFJORD "
                        "train_T); joint / alternate: TO-FLOW end-time optimizer (own Adam, alpha*|T| penalty, "
                        "clip), with the same backward (joint) or by coordinate descent (alternate)")
    g.add_argument("--T-lr", type=float, default=1e-2, help="TO-FLOW end-time learning rate")
    g.add_argument("--T-alpha", type=float, default=0.1, help="TO-FLOW temporal regularisation alpha*|T|")
    g.add_argument("--T-eps", type=float, default=0.1, help="TO-FLOW clip: T in [eps, 2*T0 - eps]")

    g = p.add_argument_group("training solver")
    g.add_argument("--method", default="dopri5", type=_method, metavar="METHOD",
                   help="ODE method: " + ", ".join(_method_names()))
    g.add_argument("--step-size", type=float, default=None,
                   help=f"step size of fixed-grid methods (default {DEFAULT_FIXED_STEP} for them)")
    g.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of adaptive methods")
    g.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of adaptive methods")
    g.add_argument("--gradient", default="direct", choices=GRADIENT_CHOICES,
                   help="direct / checkpoint: discretise-optimise (exact gradient of the discrete solve); "
                        "adjoint: optimise-discretise (continuous adjoint)")
    g.add_argument("--solver-backend", default="auto", choices=("auto", "fastode", "torchdiffeq"),
                   help="ODE solver library")
    g.add_argument("--multilevel", type=_floats, default=None, metavar="H1,H2,...",
                   help="Disc-Opt multilevel training: fixed-grid step sizes, coarse to fine, each for an equal "
                        "share of --niters")

    g = p.add_argument_group("evaluation solver (validation, test, plots; exact trace)")
    g.add_argument("--eval-method", default=None, type=_method, metavar="METHOD",
                   help="default: the training method")
    g.add_argument("--eval-step-size", type=float, default=None,
                   help="default: the training step size (same method), else the fixed-grid default")
    g.add_argument("--eval-atol", type=float, default=None, help="default: --atol")
    g.add_argument("--eval-rtol", type=float, default=None, help="default: --rtol")
    g.add_argument("--eval-trace", default="exact", choices=("exact", "hutchinson"),
                   help="divergence estimator of the evaluation solves")

    g = p.add_argument_group("regularisers (weights; 0 = off)")
    g.add_argument("--kinetic", type=float, default=0.0, help="RNODE kinetic energy int ||f||^2 dt")
    g.add_argument("--jacobian-frobenius", type=float, default=0.0, help="RNODE int ||e^T df/dz||^2 dt")
    g.add_argument("--taynode-order", type=int, default=None, choices=(2, 3), help="TayNODE R_K order")
    g.add_argument("--taynode-weight", type=float, default=0.0, help="TayNODE weight")
    g.add_argument("--error-reg", default=None, choices=("global", "local", "local_biased"),
                   help="error-estimate regulariser (Pal et al.)")
    g.add_argument("--error-weight", type=float, default=0.0, help="weight of --error-reg")

    g = p.add_argument_group("optimisation")
    g.add_argument("--niters", type=int, default=10000, help="training iterations")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch (split over processes); default 100 toy, min(1000, training rows) tabular")
    g.add_argument("--test-batch-size", type=int, default=1000, help="batch of the evaluation solves")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--weight-decay", type=float, default=None, help="default 1e-5 toy, 1e-6 tabular (torch Adam)")
    g.add_argument("--lr-decay", action=argparse.BooleanOptionalAction, default=False,
                   help="FFJORD tabular schedule: lr/10 after >10 and lr/100 after >20 non-improving validations")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, batches and noise")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="model and data dtype")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: 1 for 2-D toy data, whose tiny matrix products only "
                        "lose to threading overhead; else the available cores / processes, at most 8)")

    g = p.add_argument_group("validation, checkpoints, output")
    g.add_argument("--val-every", type=int, default=None, help="default 100 toy, 200 tabular")
    g.add_argument("--patience", type=int, default=None,
                   help="stop after more than this many validations without improvement (default: never for toy, "
                        "30 for tabular, as FFJORD)")
    g.add_argument("--save", default=None, help="output directory (default runs/<data>)")
    g.add_argument("--resume", default=None, help="a checkpoint path, or 'auto' (<save>/checkpoint.pt if present)")
    g.add_argument("--ckpt-every", type=int, default=None, help="default: every validation (and on Ctrl-C)")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="PNG plots (2-D data)")
    g.add_argument("--plot-npts", type=int, default=200, help="density grid resolution per side")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fastode.data import is_toy

    toy = is_toy(args.data)
    defaults = {
        "T": 0.5 if toy else 1.0,
        "batch_size": 100 if toy else None,  # tabular: min(1000, training rows), set by BatchSource
        "weight_decay": 1e-5 if toy else 1e-6,
        "val_every": 100 if toy else 200,
        "trace": "exact" if toy else "hutchinson",
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.patience is None and not toy:
        args.patience = 30
    if args.save is None:
        args.save = os.path.join("runs", args.data)
    if args.niters < 0:
        parser.error("--niters must be >= 0")
    if (args.batch_size is not None and args.batch_size <= 0) or args.test_batch_size <= 0:
        parser.error("batch sizes must be positive")
    if args.threads is not None and args.threads <= 0:
        parser.error("--threads must be positive")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        parser.error(f"--resume {args.resume}: no such file (use --resume auto to continue the run in --save "
                     f"if it has a checkpoint)")
    from fastode.flows.solver import FIXED_GRID_METHODS

    args.defaulted = []  # what this function chose, printed by train()
    if args.method in FIXED_GRID_METHODS and args.step_size is None and args.multilevel is None:
        args.step_size = DEFAULT_FIXED_STEP
        args.defaulted.append(f"--step-size {DEFAULT_FIXED_STEP} (fixed-grid --method {args.method} needs a step)")
    if (args.eval_method is not None and args.eval_method != args.method and args.eval_method in FIXED_GRID_METHODS
            and args.eval_step_size is None):
        args.eval_step_size = DEFAULT_FIXED_STEP
        args.defaulted.append(f"--eval-step-size {DEFAULT_FIXED_STEP} (fixed-grid --eval-method {args.eval_method})")
    if args.val_every <= 0:
        parser.error("--val-every must be positive")
    if args.num_blocks <= 0:
        parser.error("--num-blocks must be positive")
    if args.T <= 0:
        parser.error("--T must be positive")
    if args.taynode_weight and args.taynode_order is None:
        args.taynode_order = 2
    if args.taynode_order is not None and not args.taynode_weight:
        parser.error("--taynode-order needs a positive --taynode-weight")
    if args.error_reg is not None and args.error_weight == 0.0:
        parser.error("--error-reg needs a positive --error-weight")
    if args.multilevel is not None:
        if args.method not in FIXED_GRID_METHODS:
            parser.error(f"--multilevel re-discretises a fixed grid: use a fixed-grid --method (e.g. rk4), "
                         f"not {args.method!r}")
        if not args.multilevel or any(h <= 0 for h in args.multilevel):
            parser.error("--multilevel needs positive step sizes, e.g. 0.25,0.125")
    return args


# ---------------------------------------------------------------------------------------------------------
# processes and devices

@dataclasses.dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``device`` to use; whether torch.distributed is on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec} was requested but CUDA is not available here (torch "
                             f"{torch.__version__}); use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``): nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, False, None)
    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, True, backend)


def _all_reduce_sum(values: Sequence[float], dist_info: DistInfo) -> list[float]:
    if not dist_info.distributed:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=dist_info.device if dist_info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------------
# data

def _mix_seed(*parts: int) -> int:
    """A 31-bit seed from integers (stable across runs and platforms)."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
    return int(ss.generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


class BatchSource:
    """Training batches and the fixed validation / test sets of one dataset.

    ``batch(iteration)`` returns this process's share of the global batch of that iteration; it depends
    only on ``(seed, rank, iteration)``, which makes resuming exact. Toy data: a fresh FFJORD draw per
    iteration (``ToySampler`` seeded from the triple); validation and test are fixed draws with their own
    seeds. Tabular data: epochs over the training rows, reshuffled per epoch with the same permutation on
    every process, each process taking its slice (``DistributedSampler``-style; last partial batch dropped).
    """

    def __init__(self, args, dist_info: DistInfo):
        from fastode.data import is_toy, load_dataset, toy_sample

        self.name = args.data
        self.seed = int(args.seed)
        self.rank, self.world = dist_info.rank, dist_info.world_size
        self.toy = is_toy(args.data)
        if args.batch_size is not None:
            self._check_divisible(args.batch_size)
            self.local_batch = args.batch_size // self.world
        if self.toy:
            self.tabular = None
            self.val = toy_sample(args.data, args.toy_val_size, seed=_mix_seed(self.seed, 1_000_001))
            self.tst = toy_sample(args.data, args.toy_test_size, seed=_mix_seed(self.seed, 1_000_002))
            self.dim = 2
        else:
            kwargs = {}
            if args.data in ("digits",):
                kwargs = {"seed": args.data_seed, "transform": args.digits_transform}
            elif args.data == "breast_cancer":
                kwargs = {"seed": args.data_seed}
            self.tabular = load_dataset(args.data, root=args.data_root, **kwargs)
            self.val, self.tst = self.tabular.val, self.tabular.tst
            self.trn = self.tabular.trn
            self.dim = self.tabular.n_dims
            if args.batch_size is None:  # the default fits every data set: at most the training rows
                args.batch_size = max(self.world, min(1000, len(self.trn)) // self.world * self.world)
                args.defaulted.append(f"--batch-size {args.batch_size} (min(1000, {len(self.trn)} training rows))")
                self.local_batch = args.batch_size // self.world
            self.per_epoch = len(self.trn) // args.batch_size
            if self.per_epoch < 1:
                raise UsageError(f"--batch-size {args.batch_size} is larger than the {args.data} training set "
                                 f"({len(self.trn)} rows); use at most {len(self.trn)} or leave the default")
            self._perm_epoch, self._perm = None, None

    def _check_divisible(self, batch_size):
        if batch_size % self.world:
            raise UsageError(f"--batch-size {batch_size} must be divisible by the number of processes "
                             f"({self.world})")

    def batch(self, iteration: int) -> np.ndarray:
        if self.toy:
            from fastode.data import ToySampler

            x = ToySampler(self.name, _mix_seed(self.seed, self.rank, iteration))(self.local_batch)
            if len(x) != self.local_batch:
                raise ValueError(f"{self.name} returns multiples of its class count; choose a per-process batch "
                                 f"size divisible by it (got {self.local_batch})")
            return x
        epoch, pos = divmod(iteration, self.per_epoch)
        if self._perm_epoch != epoch:
            self._perm = np.random.RandomState(_mix_seed(self.seed, 7, epoch)).permutation(len(self.trn))
            self._perm_epoch = epoch
        start = pos * self.local_batch * self.world + self.rank * self.local_batch
        return self.trn[self._perm[start:start + self.local_batch]]

    def shard(self, data: np.ndarray) -> np.ndarray:
        """This process's contiguous slice of an evaluation set."""
        n = len(data)
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return data[lo:hi]


# ---------------------------------------------------------------------------------------------------------
# model

def _regularizers(args) -> dict:
    regs = {}
    if args.kinetic:
        regs["kinetic"] = args.kinetic
    if args.jacobian_frobenius:
        regs["jacobian_frobenius"] = args.jacobian_frobenius
    if args.taynode_order is not None:
        regs[f"r{args.taynode_order}"] = args.taynode_weight
    if args.error_reg is not None:
        regs[{"global": "global_error", "local": "local_error", "local_biased": "local_error_biased"}[args.error_reg]] = \
            args.error_weight
    return regs


def _train_solver(args, step_size=None):
    from fastode.flows import Solver

    return Solver(method=args.method, rtol=args.rtol, atol=args.atol,
                  step_size=step_size if step_size is not None else args.step_size,
                  gradient=args.gradient, backend=args.solver_backend)


def _eval_solver(args):
    from fastode.flows import Solver

    method = args.eval_method or args.method
    same = method == args.method
    step = args.eval_step_size if args.eval_step_size is not None else (args.step_size if same else None)
    if args.multilevel is not None and same and args.eval_step_size is None:
        step = args.multilevel[-1]
    return Solver(method=method, rtol=args.eval_rtol if args.eval_rtol is not None else args.rtol,
                  atol=args.eval_atol if args.eval_atol is not None else args.atol, step_size=step,
                  gradient="direct", backend=args.solver_backend)


def build_model(args, dim: int):
    """The flow described by ``args`` (FFJORD's ``build_model`` via :func:`fastode.flows.build_flow`)."""
    from fastode.flows import build_flow

    first_h = args.multilevel[0] if args.multilevel is not None else None
    return build_flow(
        dim, hidden=tuple(args.dims), activation=args.activation, num_blocks=args.num_blocks, T=args.T,
        learn_T=args.T_mode != "fixed", time_varying=args.time_varying, nn_backend=args.nn_backend,
        trace=args.trace, noise=args.noise, train_solver=_train_solver(args, first_h),
        eval_solver=_eval_solver(args), eval_trace=None if args.eval_trace == "hutchinson" else "exact",
        regularizers=_regularizers(args),
        # FFJORD's train_T optimises s with T = s^2; TO-FLOW optimises T itself (and a fixed T stays exact)
        T_parametrization="sqrt" if args.T_mode == "ffjord" else "linear")


def wrap_for_training(flow, dist_info: DistInfo):
    """The module the training forward pass runs through (``density_loss(flow, x, module=...)``): ``flow``
    itself, or its ``DistributedDataParallel`` wrapper under torch.distributed (gradients are then averaged
    over the processes during ``backward``; with equal per-process batches this is the gradient of the loss
    on the combined batch)."""
    if not dist_info.distributed:
        return flow
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = dist_info.device
    return DDP(flow, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)


@contextlib.contextmanager
def _averaged_grads(params, dist_info: DistInfo):
    """While active, the gradients of ``params`` are averaged over the processes as backward computes them."""
    if not dist_info.distributed:
        yield
        return
    import torch.distributed as dist

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / dist_info.world_size

    handles = [p.register_hook(hook) for p in params]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _replicas_identical(flow, dist_info: DistInfo):
    """Under torch.distributed: whether every process holds bitwise the same weights (and end times) after
    training, as data-parallel training must keep them; None for a single process."""
    if not dist_info.distributed:
        return None
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).double() for p in flow.parameters()])
    if dist_info.backend != "nccl":
        flat = flat.cpu()
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def _end_times(flow) -> list[float]:
    return [float(b.T.detach()) for b in flow.cnf_blocks()]


# ---------------------------------------------------------------------------------------------------------
# evaluation

def evaluate_nll(flow, data: np.ndarray, batch_size: int, device, dtype, dist_info: DistInfo | None = None):
    """Mean NLL (nats) of ``data`` under ``flow`` in evaluation mode (eval solver, eval trace), the mean NFE
    per batch and the per-sample NLLs of ``data``. Under torch.distributed (``dist_info``) every process
    passes its own shard and the means are combined over the processes."""
    dist_info = dist_info or DistInfo()
    was_training = flow.training
    flow.eval()
    total, count, nfe_total, nbatches, per_sample = 0.0, 0, 0.0, 0, []
    try:
        for i in range(0, len(data), batch_size):
            x = torch.as_tensor(data[i:i + batch_size], dtype=dtype, device=device)
            flow.reset_nfe()
            with torch.no_grad():
                logp = flow.log_prob(x)
            per_sample.append(-logp.double().cpu().numpy())
            total += float(-logp.double().sum())
            count += len(x)
            nfe_total += float(flow.nfe)
            nbatches += 1
    finally:
        flow.train(was_training)
    total, count, nfe_total, nbatches = _all_reduce_sum([total, count, nfe_total, nbatches], dist_info)
    nll = total / max(count, 1)
    return nll, nfe_total / max(nbatches, 1), (np.concatenate(per_sample) if per_sample else np.zeros(0))


# ---------------------------------------------------------------------------------------------------------
# checkpoints

_MODEL_KEYS = ("data", "dims", "activation", "num_blocks", "time_varying", "T_mode", "digits_transform",
               "data_seed")


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _config(args) -> dict:
    return {k: _jsonable(v) for k, v in vars(args).items()}


def _save_checkpoint(path, state: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path, args):
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UsageError(f"cannot resume from {path}: it is not a readable checkpoint ({type(exc).__name__}: "
                         f"{exc})") from None
    old = state.get("config", {})
    for k in _MODEL_KEYS:
        if k in old and _jsonable(getattr(args, k)) != old[k]:
            raise UsageError(f"cannot resume from {path}: it was trained with --{k.replace('_', '-')} {old[k]!r}, "
                             f"this run has {_jsonable(getattr(args, k))!r}")
    return state


def _versions() -> dict:
    import fastode

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "fastode": getattr(fastode, "__version__", "?")}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except Exception:
        out["commit"] = None
    return out


def _machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------------------------------------
# training

def _pick_threads(args, dist_info: DistInfo) -> tuple[int, str]:
    """CPU threads per process and why. Oversubscribed threads on a busy machine cost far more than they
    gain on a CNF's small matrix products (5-7x slower than one thread was measured on a loaded 2-core
    machine), so the default is deliberate rather than torch's "all cores"."""
    if args.threads:
        return args.threads, "--threads"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    from fastode.data import is_toy

    if is_toy(args.data):
        return 1, "2-D toy data: threading overhead exceeds the work; --threads N to change"
    n = max(1, min(cores // max(dist_info.world_size, 1), 8))
    return n, f"{cores} available cores / {dist_info.world_size} process(es), at most 8; --threads N to change"


def _headline_in_data_space(tab) -> bool:
    """Whether a tabular set's headline NLLs are converted from model to data space (the set asks for it and
    its preprocessing has a log-determinant)."""
    return tab.headline_space == "data" and tab.logdet is not None


def _val_in_headline_space(source, val_nll_model: float) -> float:
    """The validation NLL in the space of the headline test NLL, so that the two numbers printed and reported
    can be compared."""
    tab = source.tabular
    if tab is None or not _headline_in_data_space(tab):
        return val_nll_model
    return val_nll_model - tab.mean_logdet("val")


def _space_label(source) -> str:
    tab = source.tabular
    if tab is None:
        return "nats, data space"
    return f"nats, {'data' if _headline_in_data_space(tab) else 'model'} space"


def _solve_paths(flow) -> list:
    """Per CNF block: which engine ran its latest training solve and why the earlier ones did not
    (``CNF.last_solve``)."""
    out = []
    for b in flow.cnf_blocks():
        rec = getattr(b, "last_solve", None)
        out.append({"engine": None if rec is None else rec.engine,
                    "skipped": [] if rec is None else [list(s) for s in rec.skipped],
                    "text": None if rec is None else rec.describe()})
    return out


def _describe_paths(paths) -> str:
    parts = [p["text"] or "not recorded (this flow's blocks do not report an engine)" for p in paths]
    return "; ".join(dict.fromkeys(parts))


def _set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def _progress(iterable, enabled, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kw)


class TrainLoop:
    """One training run described by ``args`` (from :func:`parse_args`), in pieces: the set-up (model, optimizers,
    DDP, a fresh or resumed state), :meth:`step` (one iteration's update), :meth:`validate` (validation NLL, best
    weights, learning-rate decay, early stopping), :meth:`checkpoint` and :meth:`report`; :meth:`run` drives them
    (:func:`train` is ``TrainLoop(args).run()``)."""

    def __init__(self, args, dist_info: DistInfo | None = None):
        from fastode.flows import EndTimeOptimizer, network_parameters

        self.args = args
        self.dist_info = dist_info = dist_info or init_distributed(args.device)
        self.device = dist_info.device
        self.dtype = torch.float64 if args.dtype == "float64" else torch.float32
        self.main_proc = dist_info.is_main
        args.defaulted = getattr(args, "defaulted", [])
        self.threads, self.threads_why = _pick_threads(args, dist_info)
        torch.set_num_threads(self.threads)
        self.say(f"{self.device}, {self.threads} thread(s) per process ({self.threads_why})")

        torch.manual_seed(args.seed)  # identical initial weights on every process
        self.source = BatchSource(args, dist_info)
        if args.defaulted:
            self.say("chose " + "; ".join(args.defaulted))
        self.flow = build_model(args, self.source.dim).to(device=self.device, dtype=self.dtype)
        if args.T_mode in ("joint", "alternate"):
            theta = list(network_parameters(self.flow))
            self.t_opt = EndTimeOptimizer(self.flow, lr=args.T_lr, alpha=args.T_alpha, eps=args.T_eps,
                                          mode=args.T_mode)
        else:
            theta, self.t_opt = list(self.flow.parameters()), None
        self.optimizer = torch.optim.Adam(theta, lr=args.lr, weight_decay=args.weight_decay)
        self.ddp = wrap_for_training(self.flow, dist_info)
        self.ckpt_path = os.path.join(args.save, "checkpoint.pt")
        self.best_path = os.path.join(args.save, "best.pt")
        self.levels = list(args.multilevel) if args.multilevel is not None else None
        self.current_level = None
        self.paths = None  # the solve path(s) of the first iteration (reported once)
        # the state a checkpoint holds (fresh here; resume() loads it)
        self.start, self.best_val, self.best_itr, self.bad_checks, self.lr_scale = 0, math.inf, None, 0, 1.0
        self.history = {"iteration": [], "loss": [], "nfe_forward": [], "nfe_backward": [], "time": [], "val": []}
        self.train_time = 0.0
        self.resume()

    def say(self, msg):
        if self.main_proc:
            print(f"fastode train: {msg}", flush=True)

    def resume(self) -> None:
        """Load ``--resume`` (``auto``: the run's own checkpoint, when there is one)."""
        args = self.args
        resume = args.resume
        if resume == "auto":
            resume = self.ckpt_path if os.path.exists(self.ckpt_path) else None
        if not resume:
            return
        state = _load_checkpoint(resume, args)
        self.flow.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.t_opt is not None and state.get("t_optimizer") is not None:
            self.t_opt.optimizer.load_state_dict(state["t_optimizer"])
        self.start = int(state["iteration"])
        self.best_val, self.best_itr = state["best_val"], state["best_iteration"]
        self.bad_checks, self.lr_scale = state["bad_checks"], state["lr_scale"]
        self.history, self.train_time = state["history"], state["train_time"]
        _set_lr(self.optimizer, args.lr * self.lr_scale)
        self.say(f"resumed from {resume} at iteration {self.start} of {args.niters}"
                 + (" (nothing left to train: raise --niters to continue)" if self.start >= args.niters else ""))

    def snapshot(self, iteration: int) -> dict:
        """What a checkpoint holds after ``iteration`` iterations."""
        return {"iteration": iteration, "model": self.flow.state_dict(), "optimizer": self.optimizer.state_dict(),
                "t_optimizer": self.t_opt.optimizer.state_dict() if self.t_opt is not None else None,
                "best_val": self.best_val, "best_iteration": self.best_itr, "bad_checks": self.bad_checks,
                "lr_scale": self.lr_scale, "history": self.history, "train_time": self.train_time,
                "config": _config(self.args)}

    def checkpoint(self, iteration: int, path: str | None = None) -> None:
        if self.main_proc:
            _save_checkpoint(path or self.ckpt_path, self.snapshot(iteration))

    def _set_level(self, itr: int) -> None:
        """Multilevel training: the train solver of the level ``itr`` falls in."""
        if self.levels is None:
            return
        level = min(itr * len(self.levels) // max(self.args.niters, 1), len(self.levels) - 1)
        if level != self.current_level:
            self.current_level = level
            self.flow.set_train_solver(_train_solver(self.args, self.levels[level]))

    def step(self, itr: int) -> tuple:
        """Iteration ``itr``'s update: ``(loss, forward NFE, backward NFE, seconds)``, appended to the history."""
        from fastode.flows import density_loss

        args, flow, device, dist_info = self.args, self.flow, self.device, self.dist_info
        self._set_level(itr)
        x = torch.as_tensor(self.source.batch(itr), dtype=self.dtype, device=device)
        gen = torch.Generator(device=device).manual_seed(_mix_seed(args.seed, dist_info.rank, itr, 99))
        t0 = time.perf_counter()
        flow.reset_nfe()
        self.optimizer.zero_grad(set_to_none=True)
        if self.t_opt is not None:
            self.t_opt.zero_grad()
        loss, info = density_loss(flow, x, noise=gen, module=self.ddp)
        nfe_f = float(flow.nfe)
        loss.backward()
        nfe_b = float(flow.nfe) - nfe_f
        self.optimizer.step()
        if self.t_opt is not None:
            if args.T_mode == "alternate":
                # coordinate descent on T: a second forward/backward with theta frozen, outside DDP (whose
                # reducer expects every parameter's gradient); the T gradients are averaged by hooks instead
                gen_t = torch.Generator(device=device).manual_seed(_mix_seed(args.seed, dist_info.rank, itr, 98))
                with _averaged_grads(self.t_opt.parameters, dist_info):
                    self.t_opt.alternate_step(lambda: density_loss(flow, x, noise=gen_t)[0])
            else:
                self.t_opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        self.train_time += dt
        loss_value = float(loss.detach())
        for key, value in (("iteration", itr), ("loss", loss_value), ("nfe_forward", nfe_f),
                           ("nfe_backward", nfe_b), ("time", dt)):
            self.history[key].append(value)
        return loss_value, nfe_f, nfe_b, dt

    def validate(self, done: int) -> str:
        """Validation after ``done`` iterations: the best weights saved, the learning rate decayed on no progress;
        returns the progress line."""
        args, source = self.args, self.source
        val_nll, val_nfe, _ = evaluate_nll(self.flow, source.shard(source.val), args.test_batch_size, self.device,
                                           self.dtype, self.dist_info)
        self.history["val"].append({"iteration": done, "nll": _val_in_headline_space(source, val_nll),
                                    "nll_model_space": val_nll, "nfe": val_nfe})
        if val_nll < self.best_val:
            self.best_val, self.best_itr, self.bad_checks = val_nll, done, 0
            self.checkpoint(done, self.best_path)
        else:
            self.bad_checks += 1
            if args.lr_decay:
                self.lr_scale = 0.01 if self.bad_checks > 20 else (0.1 if self.bad_checks > 10 else 1.0)
                _set_lr(self.optimizer, args.lr * self.lr_scale)
        return (f"iter {done}: val NLL {_val_in_headline_space(source, val_nll):.4f} "
                f"(best {_val_in_headline_space(source, self.best_val):.4f} @ {self.best_itr}; "
                f"{_space_label(source)}), eval NFE {val_nfe:.0f}")

    @property
    def stop_early(self) -> bool:
        return self.args.patience is not None and self.bad_checks > self.args.patience

    def _report_path(self, bar) -> None:
        self.paths = _solve_paths(self.flow)
        line = f"solve path: {_describe_paths(self.paths)}"
        if self.main_proc and hasattr(bar, "write"):
            bar.write(f"fastode train: {line}")
        else:
            self.say(line)

    def _show(self, bar, loss: float, nfe_f: float, nfe_b: float) -> None:
        if self.main_proc and self.args.progress and hasattr(bar, "set_postfix"):
            post = {"loss": f"{loss:.4f}", "nfe": f"{nfe_f:.0f}/{nfe_b:.0f}"}
            Ts = _end_times(self.flow)
            if Ts and self.args.T_mode != "fixed":
                post["T"] = f"{Ts[0]:.3f}"
            bar.set_postfix(post, refresh=False)

    def run(self) -> dict:
        """Train from the start (or the resumed iteration) to ``--niters`` or early stopping, then evaluate the best
        weights; the report dict (also written to ``<save>/report.json`` by the main process). Ctrl-C saves a
        checkpoint to resume from."""
        args = self.args
        ckpt_every = args.ckpt_every or args.val_every
        bar = _progress(range(self.start, args.niters), self.main_proc and args.progress, initial=self.start,
                        total=args.niters, desc=f"train {args.data}")
        self.flow.train()
        completed = self.start  # iterations whose update has been applied (what a checkpoint written now holds)
        stopped_early = False
        try:
            for itr in bar:
                loss, nfe_f, nfe_b, _ = self.step(itr)
                completed = done = itr + 1
                if self.paths is None:
                    self._report_path(bar)
                self._show(bar, loss, nfe_f, nfe_b)
                if done % args.val_every == 0 or done == args.niters:
                    line = self.validate(done)
                    if self.main_proc and args.progress and hasattr(bar, "write"):
                        bar.write(line)
                    stopped_early = self.stop_early
                if done % ckpt_every == 0 or done == args.niters or stopped_early:
                    self.checkpoint(done)
                if stopped_early:
                    break
        except KeyboardInterrupt:
            if hasattr(bar, "close"):
                bar.close()
            self.checkpoint(completed)
            self.say(f"interrupted after {completed} of {args.niters} iterations; checkpoint saved to "
                     f"{self.ckpt_path}. Resume: the same command with --save {args.save} --resume auto")
            raise
        if hasattr(bar, "close"):
            bar.close()
        return self.report(completed, stopped_early)

    def report(self, completed: int, stopped_early: bool) -> dict:
        """The final evaluation with the best weights, as the report dict (written by the main process)."""
        args, flow, dist_info = self.args, self.flow, self.dist_info
        in_sync = _replicas_identical(flow, dist_info)
        if dist_info.distributed:
            import torch.distributed as dist

            dist.barrier()
        if os.path.exists(self.best_path):
            flow.load_state_dict(torch.load(self.best_path, map_location="cpu", weights_only=False)["model"])
        report = _final_report(args, flow, self.source, dist_info, self.dtype, completed, self.best_val,
                               self.best_itr, stopped_early, self.history, self.train_time)
        report["replicas_identical"] = in_sync
        report["threads"] = {"per_process": self.threads, "why": self.threads_why}
        report["solve_path"] = self.paths if self.paths is not None else _solve_paths(flow)
        report["defaults_chosen"] = list(args.defaulted)
        if self.main_proc:
            with open(os.path.join(args.save, "report.json"), "w") as fh:
                json.dump(report, fh, indent=2)
        return report


def train(args, dist_info: DistInfo | None = None) -> dict:
    """Run the training described by ``args`` (from :func:`parse_args`); returns the report dict (also written
    to ``<save>/report.json`` by the main process)."""
    return TrainLoop(args, dist_info).run()


def _final_report(args, flow, source, dist_info, dtype, completed, best_val, best_itr, stopped_early, history,
                  train_time) -> dict:
    device = dist_info.device
    t0 = time.perf_counter()
    tst_nll, eval_nfe, per_sample = evaluate_nll(flow, source.shard(source.tst), args.test_batch_size, device,
                                                 dtype, dist_info)
    eval_time = time.perf_counter() - t0
    report = {
        "dataset": args.data,
        "n_dims": source.dim,
        "iterations": completed,
        "best_iteration": best_itr,
        "stopped_early": stopped_early,
        "val_nll_best": None if not math.isfinite(best_val) else _val_in_headline_space(source, best_val),
        "val_nll_best_model_space": None if not math.isfinite(best_val) else best_val,
        "test_nll_model_space": tst_nll,
        "test_size": len(source.tst),
    }
    tab = source.tabular
    if tab is not None and tab.logdet is not None:
        # data-space NLL of the rows this process evaluated, combined over processes
        ld = source.shard(tab.logdet["tst"])
        s, n = _all_reduce_sum([float(np.sum(per_sample - ld)), len(ld)], dist_info)
        report["test_nll_data_space"] = s / n
    if tab is None:
        report["nll_space"] = "nats, the 2-D data space"
        report["test_nll"] = tst_nll
    else:
        report["nll_space"] = tab.nll_space
        report["test_nll"] = report["test_nll_data_space"] if _headline_in_data_space(tab) else tst_nll
        if tab.bits_per_dim:
            report["test_bits_per_dim"] = report["test_nll"] / (source.dim * math.log(2))
    report["test_nll_unit"] = "nats"
    report["headline_space"] = _space_label(source)  # the space of test_nll and val_nll_best
    times = history["time"]
    report.update({
        "train_nfe_forward_mean": float(np.mean(history["nfe_forward"])) if times else None,
        "train_nfe_backward_mean": float(np.mean(history["nfe_backward"])) if times else None,
        "eval_nfe_per_batch": eval_nfe,
        "time_per_iteration_s_mean": float(np.mean(times)) if times else None,
        "time_per_iteration_s_median": float(np.median(times)) if times else None,
        "train_time_s": train_time,
        "test_eval_time_s": eval_time,
        "T": _end_times(flow),
        "train_solver": [b.train_solver.describe() for b in flow.cnf_blocks()],
        "eval_solver": [b.eval_solver.describe() for b in flow.cnf_blocks()],
        "solver_backend": [_resolved_backend(b.train_solver) for b in flow.cnf_blocks()],
        "nn_backend": [getattr(b.last_solve, "mlp_backend", None) for b in flow.cnf_blocks()],
    })
    flow.eval()
    x = torch.as_tensor(source.tst[:args.test_batch_size], dtype=dtype, device=device)
    with torch.no_grad():
        report["inverse_error"] = float(flow.inverse_error(x))
    flow.train()
    report["history"] = {"val": history["val"]}
    report["world_size"] = dist_info.world_size
    report["device"] = str(device)
    report["machine"] = _machine(device)
    report["versions"] = _versions()
    report["config"] = _config(args)
    report["plots"] = _plots(args, flow, source, dtype, device, history) if (dist_info.is_main and args.plot) else []
    return report


def _resolved_backend(solver) -> str:
    from fastode.flows.solver import resolve_backend

    return resolve_backend(solver)


def _plots(args, flow, source, dtype, device, history) -> list[str]:
    from fastode.apps import plots

    out = []
    its = history["iteration"]
    out.append(plots.plot_curves(os.path.join(args.save, "curves.png"), {
        "training loss": (its, history["loss"]),
        "NFE (forward)": (its, history["nfe_forward"]),
        "validation NLL": ([v["iteration"] for v in history["val"]], [v["nll"] for v in history["val"]]),
    }, title=args.data))
    flow.eval()
    try:
        if source.dim == 2:
            def log_prob(pts):
                with torch.no_grad():
                    return flow.log_prob(torch.as_tensor(pts, dtype=dtype, device=device)).double().cpu().numpy()

            with torch.no_grad():
                samples = flow.sample(20000).double().cpu().numpy()
            out.append(plots.plot_density_2d(os.path.join(args.save, "density.png"), source.tst, log_prob, samples,
                                             npts=args.plot_npts, title=f"{args.data}: data / density / samples"))
            out.append(_trajectory_plot(args, flow, dtype, device))
        elif source.tabular is not None and source.tabular.info.get("image_shape") and source.tabular.transform:
            out.append(_image_samples_plot(args, flow, source, dtype, device))
    finally:
        flow.train()
    return [p for p in out if p]


def _trajectory_plot(args, flow, dtype, device, n=5000, frames=6) -> str | None:
    """Samples pushed from the base (t = T of the last block) back to data space, shown at about ``frames``
    times spread over the blocks, each with its block's vector field."""
    from fastode.apps import plots

    blocks = list(getattr(flow, "blocks", [flow]))
    if not all(hasattr(b, "dynamics") and hasattr(b, "T") for b in blocks):
        return None
    gen = torch.Generator(device=device).manual_seed(_mix_seed(args.seed, 5))
    z = torch.randn(n, 2, generator=gen, dtype=dtype, device=device)
    shown = []
    per_block = max((frames - 1) // len(blocks), 1)
    with torch.no_grad():
        for b in reversed(blocks):
            T = float(torch.as_tensor(b.T).reshape(-1)[0])
            ts = torch.linspace(T, 0.0, per_block + 1, dtype=dtype, device=device)
            path = _integrate(b.dynamics, z, ts, b)
            shown += [(t, zt.cpu().numpy(), _velocity(b.dynamics, t, dtype, device)) for t, zt in zip(ts.tolist(), path)]
            z = path[-1]
    if len(shown) > frames:
        shown = [shown[i] for i in np.unique(np.linspace(0, len(shown) - 1, frames).round().astype(int))]
    return plots.plot_trajectory_2d(os.path.join(args.save, "trajectory.png"), shown,
                                    title=f"{args.data}: samples from the base (t = T) to the data (t = 0)")


def _velocity(dynamics, t, dtype, device):
    def f(pts):
        with torch.no_grad():
            return dynamics(torch.tensor(t, dtype=dtype, device=device),
                            torch.as_tensor(pts, dtype=dtype, device=device)).cpu().numpy()
    return f


def _integrate(dynamics, z, ts, block):
    """``z`` at the times ``ts`` under ``dz/dt = dynamics(t, z)`` with the block's eval solver method."""
    solver = getattr(block, "eval_solver", None)
    method = getattr(solver, "method", "dopri5")
    kw = {}
    if solver is not None:
        kw = {"rtol": solver.rtol, "atol": solver.atol, "options": solver.full_options() or None}
    try:
        from fastode import odeint
    except ImportError:
        from torchdiffeq import odeint
    return odeint(dynamics, z, ts, method=method, **kw)


def _image_samples_plot(args, flow, source, dtype, device) -> str:
    from fastode.apps import plots

    with torch.no_grad():
        z = flow.sample(50).double().cpu()
    tab = source.tabular
    x = tab.transform.inverse(z).numpy()
    shape = tab.info["image_shape"]
    keep = tab.info.get("pixels_kept")
    images = np.zeros((len(x), shape[0] * shape[1]))
    images[:, keep if keep is not None else slice(None)] = x
    return plots.plot_image_samples(os.path.join(args.save, "samples.png"), np.clip(images, 0, 17), tuple(shape),
                                    title=f"{args.data}: model samples")


def main(argv: Sequence[str] | None = None) -> int:
    """``fastode train``: 0 on success, 2 for a usage mistake (one line on stderr), 130 after Ctrl-C (the
    checkpoint is saved and the resume command printed)."""
    from fastode.errors import InvalidMethodError, InvalidOptionError

    args = parse_args(argv)
    dist_info = None
    try:
        dist_info = init_distributed(args.device)
        report = train(args, dist_info)
        if dist_info.is_main:
            line = f"test NLL {report['test_nll']:.4f} ({report['headline_space']})"
            if report.get("val_nll_best") is not None:
                line += f", best validation NLL {report['val_nll_best']:.4f} (same space)"
            if "test_bits_per_dim" in report:
                line += f", {report['test_bits_per_dim']:.4f} bits/dim"
            print(f"{line}; inverse error {report['inverse_error']:.2e}; report: "
                  f"{os.path.join(args.save, 'report.json')}")
    except (UsageError, InvalidMethodError, InvalidOptionError, FileNotFoundError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fastode train: error: {msg}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"fastode train: error: {exc} (install the extra that provides it, e.g. pip install "
              f"'fastode[demo]')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if dist_info is not None and dist_info.distributed:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
