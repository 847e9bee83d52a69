"""GPU tier of the Triton kernels (marked ``gpu``; skipped without CUDA or under the interpreter).

What only a GPU can show: real TF32 behaviour (the interpreter never emulates it), larger shapes with the
default tiles, bitwise determinism of the compiled reductions, the atomic ticket of the epilogue across
concurrent programs, and capture in a CUDA graph (which proves there is no host synchronisation).
"""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (and no TRITON_INTERPRET)"),
]

if torch.cuda.is_available() and not INTERPRET:
    triton = pytest.importorskip("triton")
    from fastode.nn import ConcatSquashMLP, backends
    from fastode.nn import functional as F
    from fastode.triton import _mlp as TB
    from fastode.triton._rk import rk_epilogue, rk_error_ratio, rk_stage

DEV = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32_in_references():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    TB.configure(BM=None, CH=None, max_programs=None)
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def ffjord_params(dtype, D=2, hidden=(64, 64, 64), seed=0):
    torch.manual_seed(seed)
    m = ConcatSquashMLP(D, hidden).to(device=DEV, dtype=dtype)
    return m, m.params()


def test_fp32_kernel_is_fp32_accurate_not_tf32():
    m, params = ffjord_params(torch.float32)
    z = torch.randn(8192, 2, device=DEV) * 2
    e = torch.randn_like(z)
    t = torch.tensor(0.5, device=DEV)
    p64 = [tuple(p.double() for p in layer) for layer in params]
    ref = F.concatsquash_mlp_hutchinson(t.double(), z.double(), e.double(), p64, "tanh")
    got = TB.concatsquash_mlp_hutchinson(t, z, e, params, "tanh")
    errs = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)]
    # exact FP32 dots: ~1e-6 relative; TF32 (10-bit mantissa) would give ~1e-3
    assert max(errs) < 2e-5, errs
    if torch.cuda.get_device_capability()[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = F.concatsquash_mlp_hutchinson(t, z, e, params, "tanh")
        torch.backends.cuda.matmul.allow_tf32 = False
        tf32_err = max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(tf32, ref))
        assert max(errs) < tf32_err / 10, (errs, tf32_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_batch_values_and_grads(dtype):
    m, params = ffjord_params(dtype)
    z = torch.randn(10000, 2, device=DEV, dtype=dtype, requires_grad=True)
    e = torch.randn_like(z)
    t = torch.tensor(0.3, device=DEV, dtype=dtype, requires_grad=True)
    flat = [p for layer in params for p in layer]

    def run(impl):
        f, vjp, tr, kin, fr = impl.concatsquash_mlp_hutchinson(t, z, e, params, "tanh")
        loss = (f * f).mean() + tr.mean() + 0.01 * kin.mean() + 0.01 * fr.mean() + vjp.sum() * 1e-3
        return [f, tr], torch.autograd.grad(loss, [t, z] + flat)

    o1, g1 = run(TB)
    o2, g2 = run(F)
    rt = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(list(o1) + list(g1), list(o2) + list(g2)):
        torch.testing.assert_close(a, b, rtol=rt, atol=rt * max(1.0, b.abs().max().item()))


def test_deterministic_parameter_gradients():
    m, params = ffjord_params(torch.float32)
    z = torch.randn(50000, 2, device=DEV)
    e = torch.randn_like(z)
    flat = [p for layer in params for p in layer]

    def grads():
        f, vjp, tr, kin, fr = TB.concatsquash_mlp_hutchinson(0.1, z, e, params, "tanh")
        return torch.autograd.grad(tr.sum() + kin.sum(), flat)

    a, b = grads(), grads()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_auto_backend_is_triton_on_cuda():
    m, _ = ffjord_params(torch.float32)
    m(0.0, torch.randn(10, 2, device=DEV))
    assert m.last_backend == "triton" and backends.resolve_backend_name("auto", DEV) == "triton"


def test_exact_trace_and_wide_network():
    torch.manual_seed(1)
    m = ConcatSquashMLP(16, (256, 256), "softplus").to(DEV)
    z = torch.randn(3000, 16, device=DEV)
    f, tr = TB.concatsquash_mlp_exact_trace(0.2, z, m.params(), "softplus")
    f2, tr2 = F.concatsquash_mlp_exact_trace(0.2, z, m.params(), "softplus")
    torch.testing.assert_close(f, f2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tr, tr2, rtol=1e-4, atol=1e-4)


def test_epilogue_many_programs_and_repeat_calls():
    g = torch.Generator(device=DEV).manual_seed(0)
    y0 = torch.randn(300, 4000, device=DEV, generator=g)
    ks = [torch.randn(300, 4000, device=DEV, generator=g) for _ in range(7)]
    b = [0.1, 0.0, 0.3, 0.2, 0.1, 0.3, 0.0]
    be = [0.01, 0.0, -0.02, 0.01, 0.0, 0.0, -0.01]
    outs = [rk_epilogue(y0, ks, b, be, 0.05, 1e-6, 1e-3) for _ in range(3)]
    sb = sum(c * k for c, k in zip(b, ks))
    se = sum(c * k for c, k in zip(be, ks))
    y1 = y0 + 0.05 * sb
    r = 0.05 * se / (1e-6 + 1e-3 * torch.max(y0.abs(), y1.abs()))
    for o in outs:
        torch.testing.assert_close(o[0], y1)
        torch.testing.assert_close(o[2], r.pow(2).mean().sqrt(), rtol=1e-5, atol=0)
        torch.testing.assert_close(o[3], r.abs().max(), rtol=1e-6, atol=0)
        torch.testing.assert_close(o[4], r.pow(2).mean(1).sqrt(), rtol=1e-5, atol=0)
        assert torch.equal(o[2], outs[0][2])  # fixed-order final reduction: bitwise reproducible


def test_rk_step_captures_in_a_cuda_graph():
    # a graph capture fails on any host synchronisation, so this proves the step is sync-free
    y0 = torch.randn(4096, 2, device=DEV)
    dt = torch.tensor(0.1, device=DEV)
    m, params = ffjord_params(torch.float32)
    a = [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]]
    b = [1 / 6, 1 / 3, 1 / 3, 1 / 6]
    be = [0.1, -0.1, 0.1, -0.1]

    def step():
        ks = [TB.concatsquash_mlp(0.0, y0, params, "tanh")]
        for row in a[1:]:
            ks.append(TB.concatsquash_mlp(0.0, rk_stage(y0, ks, row, dt), params, "tanh"))
        y1, err, rms, mx, rs, ms = rk_epilogue(y0, ks, b, be, dt, 1e-6, 1e-3)
        return y1, rms, rk_error_ratio(err, y0, y1, 1e-6, 1e-3)[0]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = step()
    eager = step()
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(out, eager):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------------------------------------------- fused CNF solves
def _toy_cnf(method, dtype, **kw):
    from fastode.flows import CNF

    torch.manual_seed(0)
    dyn = ConcatSquashMLP(2, (64, 64, 64), "tanh")
    return CNF(dyn, T=0.5, method=method, rtol=1e-5, atol=1e-5, trace="hutchinson", eval_trace="hutchinson",
               **kw).to(dtype)


@pytest.mark.parametrize("method, kw", [("dopri5", {}), ("rk4", {"step_size": 0.1})])
def test_fused_cnf_solve_on_gpu_matches_cpu(method, kw):
    """The fused engines on a ragged batch of 10 000 rows (many programs, the atomic ticket across them) against the
    same CNF on the CPU (the C++ engines, checked against odeint): values, steps, NFE and every gradient."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(10_003, 2, generator=g, dtype=dtype), torch.randn(10_003, 2, generator=g, dtype=dtype)
    outs = {}
    for dev in ("cpu", DEV):
        cnf = _toy_cnf(method, dtype, regularizers={"kinetic": 0.1, "jf": 0.1}, **kw).to(dev)
        xx = x.to(dev).requires_grad_()
        o = cnf(xx, noise=e.to(dev), compute_reg=True)
        loss = (o.out ** 2).sum() + o.logdet.sum() + sum(v.sum() for v in o.reg.values())
        loss.backward()
        outs[dev] = (cnf.last_solve, [o.out, o.logdet, xx.grad] + [p.grad for p in cnf.parameters()])
    rec = outs[DEV][0]
    assert rec.engine == ("triton_adaptive" if method == "dopri5" else "triton_grid")
    assert rec.stats.num_fevals == outs["cpu"][0].stats.num_fevals
    for a, b in zip(outs[DEV][1], outs["cpu"][1]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-10)


def test_fused_adaptive_solve_makes_no_host_sync():
    """A fused adaptive solve after a first one of the same configuration: every launch queued without a host
    synchronisation, except the one read of the solve's record at the end (checked by torch's sync debug mode)."""
    from fastode.flows.fused import triton_solve as cnf_solve

    cnf = _toy_cnf("dopri5", torch.float32).to(DEV).eval()
    x = torch.randn(10_000, 2, device=DEV)
    e = torch.randn(10_000, 2, device=DEV)
    with torch.no_grad():
        cnf(x, noise=e)  # compiles, learns the attempt count
        reads = []
        orig = cnf_solve.host_read
        cnf_solve.host_read = lambda what, n=1: (reads.append(what), torch.cuda.set_sync_debug_mode(0))
        try:
            torch.cuda.set_sync_debug_mode("error")
            cnf(x, noise=e)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            cnf_solve.host_read = orig
    assert cnf.last_solve.engine == "triton_adaptive"
    assert reads == ["solve status", "solve record"]  # sync mode was lifted only for these two reads


def test_fused_grid_solve_captures_in_a_cuda_graph():
    """The fixed-grid fused solve is a sequence of launches with no host read: it captures in a CUDA graph, and a
    replay with new inputs gives the eager result."""
    from fastode.flows.fused.triton_solve import TritonCnfSolver
    from fastode.kernels.cnf_solve import CnfLauncher
    from fastode.kernels.concatsquash import PackedParams
    from fastode.tableaus import get_tableau

    m, params = ffjord_params(torch.float32)
    cfg = TB.launch_config(2, [2, 64, 64, 64, 2], torch.float32)
    packed = PackedParams([tuple(p.detach() for p in layer) for layer in params], cfg["CH"], cfg["CD"])
    solver = TritonCnfSolver(CnfLauncher(packed, "tanh", "hutchinson", ["trace", "kinetic"], 1, get_tableau("rk4"),
                                         adaptive=False))
    grid = torch.linspace(0, 0.5, 11, device=DEV, dtype=torch.float64)
    z0 = torch.randn(4099, 2, device=DEV)
    e = torch.randn(4099, 2, device=DEV)
    q0 = torch.zeros(4099, 2, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        solver.grid(grid, z0, q0, e)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        zT, qT, _ = solver.grid(grid, z0, q0, e)
    z0.copy_(torch.randn_like(z0))
    graph.replay()
    want_z, want_q, _ = solver.grid(grid, z0, q0, e)
    torch.testing.assert_close(zT, want_z, rtol=0, atol=0)
    torch.testing.assert_close(qT, want_q, rtol=0, atol=0)
