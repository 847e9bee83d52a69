"""Backend conformance of the concatsquash MLP ops: every available backend against the PyTorch reference
(fastode.ops.concatsquash, itself checked against autograd and torch.func in tests/test_nn_functional.py).

One suite for all backends ("cpp": the C++ extension; "triton": the fused kernels, in the CPU interpreter or on
CUDA), over odd shapes (a batch of 1, ragged batches, input widths 1-3, one to two hidden layers of odd widths),
float32 and float64, every activation, which outputs feed the loss (each output alone and all together), the
two call paths (the op functions, and ``mlp.bind`` as a solve uses them, with and without autograd) and double
backward. Backend-specific behaviour (tiles, threads, persistent grids, parameter caches, build) stays in
tests/test_cpp_backend.py and tests/test_kernels_concatsquash.py.

Triton cases run in the interpreter with tiny tiles (several programs per call) and NaN-poisoned outputs, so a
value the kernels forget to write fails the test; they are fewer (the interpreter is slow).
"""
import itertools

import pytest
import torch

import fastode.cpp as fc
from fastode.ops import concatsquash as REF
from fastode.ops import mlp as MLP

from _kernels_env import KDEV, KMARK, SKIP_REASON, small_poisoned_mlp_kernels

ACTS = ("tanh", "softplus", "elu", "swish", "identity")
KINDS = ("forward", "hutchinson", "exact_trace")
OUTPUTS = {"forward": ("f",), "hutchinson": ("f", "vjp", "trace", "kinetic", "jac_frob"),
           "exact_trace": ("f", "trace")}
SHAPES = [dict(B=1, D=2, hidden=(16,)), dict(B=37, D=3, hidden=(20, 33)), dict(B=130, D=1, hidden=(9,))]
TINY = [dict(B=19, D=2, hidden=(16,)), dict(B=5, D=3, hidden=(7, 12))]  # interpreter: <= 2 programs of 16 rows


def _uses(kind):
    """Which outputs feed the loss: each alone, and all together."""
    return [(o,) for o in OUTPUTS[kind]] + [OUTPUTS[kind]] if kind != "forward" else [("f",)]


def _cases():
    cases = []
    if fc.available():
        for i, (dtype, act, kind) in enumerate(itertools.product((torch.float64, torch.float32), ACTS, KINDS)):
            for use in _uses(kind):
                cases.append(pytest.param("cpp", "cpu", dtype, act, kind, use, SHAPES[i % len(SHAPES)],
                                          id=f"cpp-{str(dtype)[6:]}-{act}-{kind}-{'+'.join(use)}-{i % 3}"))
    if SKIP_REASON is None:
        # pairwise rather than the full product: every activation and output, both dtypes and shapes
        for i, (act, kind) in enumerate(itertools.product(ACTS, KINDS)):
            dtype = (torch.float64, torch.float32)[i % 2]
            use = _uses(kind)[i % len(_uses(kind))] if i % 3 else OUTPUTS[kind]
            cases.append(pytest.param("triton", KDEV, dtype, act, kind, use, TINY[i % 2], marks=KMARK,
                                      id=f"triton-{str(dtype)[6:]}-{act}-{kind}-{'+'.join(use)}"))
    return cases


@pytest.fixture(autouse=True)
def _triton_small_and_poisoned(request):
    if "triton" not in request.node.name or SKIP_REASON is not None:
        yield
        return
    with small_poisoned_mlp_kernels():
        yield


def _params(D, hidden, dtype, device, seed=0):
    """Parameters with non-trivial gates and time biases (uniform as nn.Linear, gate weights of order 1)."""
    g = torch.Generator().manual_seed(seed)
    dims = (D,) + tuple(hidden) + (D,)
    out = []
    for i, o in zip(dims[:-1], dims[1:]):
        bound = 1.0 / i ** 0.5
        W = (torch.rand(o, i, generator=g, dtype=torch.float64) * 2 - 1) * bound
        vecs = [(torch.rand(o, generator=g, dtype=torch.float64) * 2 - 1) * s for s in (bound, 0.8, 0.5, 0.4)]
        out.append(tuple(x.to(dtype=dtype, device=device).requires_grad_() for x in (W, *vecs)))
    return out


def _inputs(B, D, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_()
    e = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_()
    t = torch.tensor(0.37, dtype=dtype, device=device, requires_grad=True)
    return t, z, e


def _call(fns, kind, t, z, e):
    if kind == "forward":
        return (fns["forward"](t, z),)
    if kind == "hutchinson":
        return tuple(fns["hutchinson"](t, z, e))
    return tuple(fns["exact_trace"](t, z))


def _function_path(impl, params, act):
    return {"forward": lambda t, z: impl.concatsquash_mlp(t, z, params, act),
            "hutchinson": lambda t, z, e: impl.concatsquash_mlp_hutchinson(t, z, e, params, act),
            "exact_trace": lambda t, z: impl.concatsquash_mlp_exact_trace(t, z, params, act)}


def _bound_path(bound):
    return {"forward": bound.forward, "hutchinson": bound.hutchinson, "exact_trace": bound.exact_trace}


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def _assert_close(got, want, dtype, what):
    """Elementwise, relative to each tensor's scale; an unused input's gradient (None) counts as zeros."""
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert torch.isfinite(a).all(), f"{what}[{i}] is not finite (an output the kernel did not write?)"
        tol = _tol(dtype)
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m: f"{what}[{i}]: {m}")


def _values_and_grads(fns, kind, use, t, z, e, params, seed=2):
    outs = _call(fns, kind, t, z, e)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for name, o in zip(OUTPUTS[kind], outs):
        if name in use:
            loss = loss + (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum()
    leaves = [t, z, e] + [p for layer in params for p in layer]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("backend, device, dtype, act, kind, use, shape", _cases())
def test_backend_matches_reference(backend, device, dtype, act, kind, use, shape):
    params = _params(shape["D"], shape["hidden"], dtype, device)
    t, z, e = _inputs(shape["B"], shape["D"], dtype, device)
    impl = MLP.resolve(backend, torch.device(device).type, (t, z, params, act))
    assert impl.name == backend
    want = _values_and_grads(_function_path(REF, params, act), kind, use, t, z, e, params)
    got = _values_and_grads(_function_path(impl, params, act), kind, use, t, z, e, params)
    _assert_close(got[0], want[0], dtype, f"{backend} {kind} outputs")
    _assert_close(got[1], want[1], dtype, f"{backend} {kind} grads (t, z, e, params...)")
    # the binding a solve uses: the same values and gradients ...
    bound = MLP.bind(params, act, z.detach(), backend)
    assert bound.backend == backend
    got_b = _values_and_grads(_bound_path(bound), kind, use, t, z, e, params)
    _assert_close(got_b[0], want[0], dtype, f"{backend} bound {kind} outputs")
    _assert_close(got_b[1], want[1], dtype, f"{backend} bound {kind} grads")
    # ... and without autograd (the C++ binding then calls the kernels directly)
    with torch.no_grad():
        plain = _call(_bound_path(bound), kind, t, z, e)
    assert not any(o.requires_grad for o in plain)
    _assert_close([o for o in plain], want[0], dtype, f"{backend} bound {kind} no-grad outputs")


def _backends():
    out = []
    if fc.available():
        out.append(pytest.param("cpp", "cpu", id="cpp"))
    if SKIP_REASON is None:
        out.append(pytest.param("triton", KDEV, marks=KMARK, id="triton"))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend, device", _backends())
def test_double_backward_matches_reference(backend, device, kind):
    """create_graph=True (FFJORD's autograd divergence on top of f; TayNODE-style higher derivatives): the
    backward is differentiable and agrees with the reference. ``z`` depends on ``t`` so that only the local
    paths of each input may be counted."""
    dtype = torch.float64
    params = _params(2, (16,), dtype, device)
    t, z0, e = _inputs(11, 2, dtype, device)
    e = e.detach()
    flat = [p for layer in params for p in layer]

    def run(impl):
        z = z0 * (1 + t)
        fns = _function_path(impl, params, "swish")
        if kind == "forward":
            f = fns["forward"](t, z)
            (vjp,) = torch.autograd.grad(f, z, e, create_graph=True)
            scalar = (vjp * e).sum() + (f * f).sum()
        elif kind == "hutchinson":
            f, vjp, tr, kin, fr = fns["hutchinson"](t, z, e)
            (gz,) = torch.autograd.grad(tr.sum() + fr.sum() + kin.sum(), z, create_graph=True)
            scalar = (gz * gz).sum()
        else:
            f, tr = fns["exact_trace"](t, z)
            (gz,) = torch.autograd.grad(tr.sum(), z, create_graph=True)
            scalar = (gz * gz).sum()
        return [scalar] + list(torch.autograd.grad(scalar, [t, z0] + flat, allow_unused=True))

    impl = MLP.resolve(backend, torch.device(device).type)
    _assert_close(run(impl), run(REF), dtype, f"{backend} {kind} double backward")


@pytest.mark.skipif(not fc.available(), reason="the C++ extension is not built")
def test_binding_made_without_grad_still_carries_parameter_gradients():
    """A CNF binds its dynamics at the first evaluation, which may run under no_grad (an adjoint's forward); the
    bound parameters must still lead back to the module's parameters when a later call wants gradients."""
    from fastode.nn import ConcatSquashMLP

    torch.manual_seed(0)
    m = ConcatSquashMLP(2, (8,), "tanh").double()
    z = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        bound = m.bind(z)
    assert bound.backend == "cpp" and m.last_backend == "cpp"
    f, tr, kin, jf = bound.forward_with_trace(0.3, z, e=torch.ones_like(z))
    grads = torch.autograd.grad(tr.sum() + f.sum(), list(m.parameters()), allow_unused=True)
    f_r, tr_r, _, _ = m.forward_with_trace(0.3, z, e=torch.ones_like(z))
    want = torch.autograd.grad(tr_r.sum() + f_r.sum(), list(m.parameters()), allow_unused=True)
    _assert_close(list(grads), list(want), torch.float64, "bound-under-no_grad parameter grads")
    assert all(g is not None for g in grads)
