"""fastode.flows.load_ffjord: checkpoints written the way FFJORD's and RNODE's training scripts write them load into a
fastode flow with the same log-likelihood and samples.

The reference is a re-statement, written for these tests (with tests/ffjord_reference.py), of what those scripts build (``train_misc.build_model_tabular``:
``SequentialFlow(chain=[MovingBatchNorm1d, CNF, MovingBatchNorm1d, ...])``; each CNF an ``ODEfunc`` around an
``ODEnet`` of concatsquash layers, wrapped in a ``RegularizedODEfunc`` when regularisers are trained, its end time
stored as ``sqrt_end_time``) and of how they evaluate it (``logpx = log N(z) - delta_logp`` with torchdiffeq's
``odeint`` over ``[0, s^2]``, the exact divergence); the repositories are not dependencies. The checkpoints are
``{"args": Namespace, "state_dict": ...}`` with randomised weights and batch-norm statistics.
"""
import argparse

import pytest
import torch
from torch import nn

from fastode.flows import CNF, MovingBatchNorm1d, SequentialFlow, load_ffjord
from ffjord_reference import ODEnet, divergence_bf

torchdiffeq = pytest.importorskip("torchdiffeq")


# ------------------------------------------------------------------------------------ the reference model
class RefODEfunc(nn.Module):
    """f and minus the exact divergence (what the scripts' evaluation uses)."""

    def __init__(self, diffeq):
        super().__init__()
        self.diffeq = diffeq
        self.register_buffer("_num_evals", torch.tensor(0.0))

    def forward(self, t, states):
        y = states[0]
        with torch.enable_grad():
            y = y.detach().requires_grad_(True) if not y.requires_grad else y
            dy = self.diffeq(t, y)
            div = divergence_bf(dy, y)
        return (dy, -div.reshape(-1, 1)) + tuple(torch.zeros_like(s) for s in states[2:])


class RefRegularizedODEfunc(nn.Module):
    def __init__(self, odefunc):
        super().__init__()
        self.odefunc = odefunc

    def forward(self, t, states):
        return self.odefunc(t, states)


class RefCNF(nn.Module):
    def __init__(self, odefunc, T, train_T, regularized, args):
        super().__init__()
        s = torch.sqrt(torch.tensor(T))
        if train_T:
            self.sqrt_end_time = nn.Parameter(s)
        else:
            self.register_buffer("sqrt_end_time", s)
        self.odefunc = RefRegularizedODEfunc(odefunc) if regularized else odefunc
        self.args = args

    def forward(self, z, logpz, reverse=False):
        times = torch.stack([torch.zeros_like(self.sqrt_end_time), self.sqrt_end_time ** 2]).to(z)
        if reverse:
            times = times.flip(0)
        a = self.args
        z_t, logp_t = torchdiffeq.odeint(self.odefunc, (z, logpz), times, method=a.test_solver or a.solver,
                                         rtol=a.test_rtol or a.rtol, atol=a.test_atol or a.atol)
        return z_t[-1], logp_t[-1]


class RefMovingBatchNorm1d(nn.Module):
    """Evaluation-mode moving batch normalisation (running statistics), as the scripts' normalization layer."""

    def __init__(self, dim, eps=1e-4):
        super().__init__()
        self.eps = eps
        self.register_buffer("step", torch.zeros(1))
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x, logpx, reverse=False):
        logdetgrad = -0.5 * torch.log(self.running_var + self.eps) + self.weight
        if reverse:
            y = (x - self.bias) * torch.exp(-self.weight)
            out = y * torch.exp(0.5 * torch.log(self.running_var + self.eps)) + self.running_mean
            return out, logpx + logdetgrad.sum().expand(x.shape[0], 1)
        y = (x - self.running_mean) * torch.exp(-0.5 * torch.log(self.running_var + self.eps))
        return y * torch.exp(self.weight) + self.bias, logpx - logdetgrad.sum().expand(x.shape[0], 1)


class RefSequentialFlow(nn.Module):
    def __init__(self, chain):
        super().__init__()
        self.chain = nn.ModuleList(chain)

    def forward(self, x, logpx, reverse=False):
        """With ``logpx`` the log-density change is carried through the chain; without it (sampling) every block
        starts its own at zero and only ``x`` comes back."""
        carry = logpx is not None
        for i in (reversed(range(len(self.chain))) if reverse else range(len(self.chain))):
            x, lp = self.chain[i](x, logpx if carry else torch.zeros(x.shape[0], 1, dtype=x.dtype), reverse=reverse)
            logpx = lp if carry else None
        return (x, logpx) if carry else x


def _args(**kw):
    base = dict(dims="16-16", layer_type="concatsquash", nonlinearity="tanh", num_blocks=2, time_length=0.5,
                train_T=True, batch_norm=True, bn_lag=0.0, solver="dopri5", atol=1e-6, rtol=1e-6, step_size=None,
                test_solver=None, test_atol=None, test_rtol=None, divergence_fn="approximate", rademacher=False,
                residual=False)
    base.update(kw)
    return argparse.Namespace(**base)


def _build(args, dim, regularized=False, seed=0, dtype=torch.float32):
    """The model the scripts build for these args, with randomised parameters and batch-norm statistics (drawn in
    ``dtype``: a float64 model's values are not float32 numbers)."""
    torch.manual_seed(seed)
    hidden = tuple(int(h) for h in args.dims.split("-"))
    cnfs = [RefCNF(RefODEfunc(ODEnet(dim, hidden, args.nonlinearity, args.layer_type)), args.time_length,
                   args.train_T, regularized, args) for _ in range(args.num_blocks)]
    chain = cnfs
    if args.batch_norm:
        chain = [RefMovingBatchNorm1d(dim)]
        for c in cnfs:
            chain += [c, RefMovingBatchNorm1d(dim)]
    model = RefSequentialFlow(chain).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sqrt_end_time"):
                p.add_(0.1 * torch.rand(()))  # a learned end time that is not the initial one
            else:
                p.copy_(0.4 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return model.eval()


def _checkpoint(model, args):
    return {"args": args, "state_dict": model.state_dict()}


def _ref_log_prob(model, x):
    z, delta_logp = model(x, torch.zeros(x.shape[0], 1, dtype=x.dtype))
    logpz = -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * torch.log(torch.tensor(2 * torch.pi, dtype=x.dtype))
    return logpz - delta_logp.reshape(-1)


# ------------------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["toy", "tabular-regularized", "no-batch-norm-fixed-T"])
def test_log_likelihood_and_samples_match_the_scripts_model(dtype, variant):
    kw, dim, reg = {"toy": ({}, 2, False),
                    "tabular-regularized": (dict(nonlinearity="softplus", dims="20", num_blocks=1), 4, True),
                    "no-batch-norm-fixed-T": (dict(batch_norm=False, train_T=False, num_blocks=1), 3, False)}[variant]
    args = _args(**kw)
    model = _build(args, dim, regularized=reg, dtype=dtype)
    flow = load_ffjord(_checkpoint(model, args))
    assert isinstance(flow, SequentialFlow) and not flow.training
    kinds = [type(b) for b in flow.blocks]
    assert kinds.count(CNF) == args.num_blocks
    assert kinds.count(MovingBatchNorm1d) == (args.num_blocks + 1 if args.batch_norm else 0)
    cnf = flow.cnf_blocks()[0]
    assert cnf.dynamics.activation == args.nonlinearity and (cnf.T_parametrization == "sqrt") == args.train_T
    assert next(flow.parameters()).dtype == dtype
    g = torch.Generator().manual_seed(5)
    x = torch.randn(29, dim, generator=g).to(dtype)
    with torch.no_grad():
        got = flow.log_prob(x)
    want = _ref_log_prob(model, x).detach()
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got, want, **tol)
    # sampling as the scripts sample (model(z, reverse=True): every block's log-density state from zero, the
    # divergence integrated): flow.inverse without the carry takes the same steps; flow.sample skips the divergence
    # (faster), so its steps differ and it agrees to the solver's tolerance
    z = torch.randn(17, dim, generator=g).to(dtype)
    want_x = model(z, None, reverse=True).detach()
    flow.carry_logdet = False
    with torch.no_grad():
        torch.testing.assert_close(flow.inverse(z)[0], want_x, **tol)
        torch.testing.assert_close(flow.sample(17, z=z), want_x, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_file_and_the_conversion_command(tmp_path):
    from fastode.flows import ffjord

    args = _args()
    model = _build(args, 2)
    path = tmp_path / "checkpt.pth"
    torch.save(_checkpoint(model, args), path)
    x = torch.randn(11, 2, generator=torch.Generator().manual_seed(2))
    want = _ref_log_prob(model, x).detach()
    with torch.no_grad():
        torch.testing.assert_close(load_ffjord(str(path)).log_prob(x), want, rtol=2e-5, atol=2e-5)
    out = tmp_path / "flow.pt"
    assert ffjord.main([str(path), str(out)]) == 0
    flow = torch.load(out, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), want, rtol=2e-5, atol=2e-5)
    flow.train()  # it trains as any fastode flow: the end time and the network get gradients
    loss = -flow.log_prob(x, noise=torch.randn(11, 2)).mean()
    loss.backward()
    assert all(b._T_raw.grad is not None for b in flow.cnf_blocks())


def test_the_moving_batch_norm_trains_as_the_scripts_layer():
    """Training mode normalises with the batch's statistics (unbiased variance) and moves the running ones by
    ``decay``; the log-determinant is the layer's Jacobian; the inverse undoes it."""
    torch.manual_seed(0)
    bn = MovingBatchNorm1d(3, decay=0.1).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.2, -0.1, 0.3]))
        bn.bias.copy_(torch.tensor([0.5, 0.0, -0.2]))
    x = torch.randn(50, 3, dtype=torch.float64) * 2 + 1
    out = bn(x)
    mean, var = x.mean(0), x.var(0)
    torch.testing.assert_close(out.out, (x - mean) / torch.sqrt(var + 1e-4) * torch.exp(bn.weight) + bn.bias)
    jac = torch.autograd.functional.jacobian(lambda v: bn.eval()(v[None]).out[0], x[0])
    bn.train()
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var)
    bn.eval()
    y = bn(x)
    torch.testing.assert_close(y.logdet[0], torch.logdet(jac))
    back = bn(y.out, reverse=True)
    torch.testing.assert_close(back.out, x)
    torch.testing.assert_close(back.logdet, -y.logdet)


@pytest.mark.parametrize("change, match", [
    (dict(layer_type="squash"), "'squash' layer"),
    (dict(nonlinearity="relu"), "nonlinearity 'relu'"),
    (dict(residual=True), "residual=True"),
])
def test_what_is_not_supported_is_named(change, match):
    args = _args(**change)
    model = _build(args, 2)
    with pytest.raises(ValueError, match=match) as info:
        load_ffjord(_checkpoint(model, args))
    assert "load_ffjord reads" in str(info.value) or "residual" in match


def test_a_foreign_layer_in_the_chain_is_named():
    args = _args(batch_norm=False, num_blocks=1)
    state = _build(args, 2).state_dict()
    state["chain.1.scale"] = torch.ones(2)  # e.g. an elementwise layer the scripts can add
    with pytest.raises(ValueError, match=r"chain\.1: a layer with parameters \['scale'\]"):
        load_ffjord({"args": args, "state_dict": state})
    with pytest.raises(ValueError, match="pass activation="):
        load_ffjord({"state_dict": _build(args, 2).state_dict()})
    flow = load_ffjord({"state_dict": _build(args, 2).state_dict()}, activation="tanh")  # a bare state dict
    assert flow.cnf_blocks()[0].dynamics.activation == "tanh"
