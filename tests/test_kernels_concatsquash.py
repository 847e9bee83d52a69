"""Fused concatsquash-MLP kernels (forward, Hutchinson, exact trace, backward): what is specific to Triton.

Every activation, dtype, output and double backward against the reference is in the backend-conformance suite
(tests/test_mlp_conformance.py). Here: input widths around the dot minimum, a single and a deep stack, a wide
layer, determinism and the persistent grid, the packed-parameter cache, the module's backend choice, an empty
batch. Runs in the Triton CPU interpreter without CUDA (tiny shapes, BLOCK 16 so several programs and the
persistent tile loop are exercised, outputs and scratch NaN-poisoned), compiled with CUDA.
"""
import pytest
import torch

from _kernels_env import KDEV, KMARK, SKIP_REASON, small_poisoned_mlp_kernels

pytestmark = [KMARK, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

if SKIP_REASON is None:
    from fastode.nn import backends
    from fastode.nn import functional as F
    from fastode.triton import _mlp as TB

ACTS = ("tanh", "softplus", "elu", "swish", "identity")


@pytest.fixture(autouse=True)
def _small_poisoned():
    with small_poisoned_mlp_kernels():
        yield


def make_params(D, hidden, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    dims = (D,) + tuple(hidden) + (D,)
    params = []
    for i, o in zip(dims[:-1], dims[1:]):
        bound = 1.0 / i ** 0.5
        W = (torch.rand(o, i, generator=g, dtype=torch.float64) * 2 - 1) * bound * scale
        vecs = [(torch.rand(o, generator=g, dtype=torch.float64) * 2 - 1) * s for s in (bound, 1.0, 1.0, 1.0)]
        params.append(tuple(x.to(dtype=dtype, device=KDEV).requires_grad_() for x in (W, *vecs)))
    return params


def inputs(B, D, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=KDEV).requires_grad_()
    e = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=KDEV).requires_grad_()
    t = torch.tensor(0.37, dtype=dtype, device=KDEV, requires_grad=True)
    return t, z, e


def call(impl, kind, t, z, e, params, act):
    if kind == "f":
        return (impl.concatsquash_mlp(t, z, params, act),)
    if kind == "hutch":
        return impl.concatsquash_mlp_hutchinson(t, z, e, params, act)
    return impl.concatsquash_mlp_exact_trace(t, z, params, act)


def values_and_grads(impl, kind, t, z, e, params, act, weights):
    outs = call(impl, kind, t, z, e, params, act)
    loss = sum((o * w).sum() for o, w in zip(outs, weights) if w is not None)
    leaves = [t, z, e] + [p for layer in params for p in layer]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs], grads


def random_weights(kind, B, D, dtype, seed=2, use=None):
    g = torch.Generator().manual_seed(seed)
    shapes = {"f": [(B, D)], "hutch": [(B, D), (B, D), (B,), (B,), (B,)], "exact": [(B, D), (B,)]}[kind]
    ws = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype=dtype, device=KDEV) for s in shapes]
    if use is not None:
        ws = [w if i in use else None for i, w in enumerate(ws)]
    return ws


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)


def assert_close_list(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert a is None and b is None or (a is None and b.abs().max() == 0) or (b is None and a.abs().max() == 0), \
                f"{what}[{i}]: one side is None"
            continue
        assert torch.isfinite(a).all(), f"{what}[{i}] has non-finite entries (unwritten poisoned output?)"
        scale = max(1.0, b.abs().max().item())
        t = tol(dtype)
        torch.testing.assert_close(a, b, rtol=t["rtol"], atol=t["atol"] * scale, msg=lambda m: f"{what}[{i}]: {m}")


def check(kind, dtype, act, D=3, hidden=(20, 33), B=37, use=None, seed=0):
    params = make_params(D, hidden, dtype, seed)
    t, z, e = inputs(B, D, dtype, seed + 1)
    w = random_weights(kind, B, D, dtype, seed + 2, use)
    o1, g1 = values_and_grads(TB, kind, t, z, e, params, act, w)
    o2, g2 = values_and_grads(F, kind, t, z, e, params, act, w)
    assert_close_list(o1, o2, dtype, f"{kind}/{act} outputs")
    assert_close_list(g1, g2, dtype, f"{kind}/{act} grads (t, z, e, params...)")


@pytest.mark.parametrize("D", [1, 2, 17])
def test_input_widths_below_and_above_dot_minimum(D):
    # widths < 16 are zero-padded to the dot minimum with masks; 17 needs two D-chunks
    check("hutch", torch.float64, "tanh", D=D, hidden=(16,), B=21)


@pytest.mark.parametrize("hidden", [(), (8, 8, 8, 8, 8)])
def test_depth_single_layer_and_deep(hidden):
    check("hutch", torch.float64, "elu", D=2, hidden=hidden, B=19)


def test_wide_hidden_256():
    TB.configure(CH=64 if KDEV == "cpu" else None)
    check("hutch", torch.float32, "tanh", D=2, hidden=(256,), B=17)


def test_deterministic_and_persistent_grid_invariant():
    dtype = torch.float64
    params = make_params(2, (16, 16), dtype)
    t, z, e = inputs(41, 2, dtype)
    w = random_weights("hutch", 41, 2, dtype)
    o1, g1 = values_and_grads(TB, "hutch", t, z, e, params, "tanh", w)
    o2, g2 = values_and_grads(TB, "hutch", t, z, e, params, "tanh", w)
    for a, b in zip(list(o1) + list(g1), list(o2) + list(g2)):
        if a is not None:
            assert torch.equal(a, b), "two identical launches differ: the reduction is not deterministic"
    TB.configure(max_programs=1)
    o3, g3 = values_and_grads(TB, "hutch", t, z, e, params, "tanh", w)
    for a, b in zip(o1, o3):  # per-row outputs do not depend on how rows are spread over programs
        assert torch.equal(a, b)
    assert_close_list(g3, g1, dtype, "grads with one program")


def test_packed_parameter_cache_tracks_in_place_updates():
    dtype = torch.float64
    params = make_params(2, (16,), dtype)
    t, z, e = inputs(9, 2, dtype)
    f1 = TB.concatsquash_mlp(t, z, params, "tanh")
    with torch.no_grad():
        params[0][0].mul_(0.5)  # optimizer-style in-place update bumps the version counter
    f2 = TB.concatsquash_mlp(t, z, params, "tanh")
    torch.testing.assert_close(f2, F.concatsquash_mlp(t, z, params, "tanh"), **tol(dtype))
    assert not torch.allclose(f1, f2)


def test_module_uses_triton_backend_and_matches_torch():
    from fastode.nn import ConcatSquashMLP

    torch.manual_seed(0)
    m = ConcatSquashMLP(2, (16, 16), "softplus", backend="triton").to(device=KDEV, dtype=torch.float64)
    z = torch.randn(13, 2, dtype=torch.float64, device=KDEV)
    e = torch.randn(13, 2, dtype=torch.float64, device=KDEV)
    out = m.forward_with_trace(0.5, z, e)
    assert m.last_backend == "triton"
    m.backend = "torch"
    ref = m.forward_with_trace(0.5, z, e)
    assert m.last_backend == "torch"
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **tol(torch.float64))


def test_empty_batch_falls_back():
    params = make_params(2, (16,), torch.float32)
    z = torch.zeros(0, 2, device=KDEV)
    assert TB.concatsquash_mlp(0.0, z, params, "tanh").shape == (0, 2)


