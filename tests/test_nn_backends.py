"""Backend registry: selection rule, global / per-module override, environment variable, lazy registration."""
import sys
import types

import pytest
import torch

from fastode.nn import ConcatSquashMLP, backends
from fastode.nn import functional as F
from fastode.ops import registry


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch):
    backends.available_backends()  # import the lazy backends first: a module is imported (and registers) once
    saved = registry.snapshot()
    monkeypatch.delenv("FASTODE_NN_BACKEND", raising=False)
    backends.set_backend(None)
    yield
    registry.restore(saved)
    backends.set_backend(None)


def counting_backend(name):
    mod = types.SimpleNamespace(calls=0, name=name)

    def wrap(fn):
        def inner(*a, **k):
            mod.calls += 1
            return fn(*a, **k)
        return inner

    mod.concatsquash_mlp = wrap(F.concatsquash_mlp)
    mod.concatsquash_mlp_hutchinson = wrap(F.concatsquash_mlp_hutchinson)
    mod.concatsquash_mlp_exact_trace = wrap(F.concatsquash_mlp_exact_trace)
    return mod


def test_torch_always_available_and_auto_on_cpu():
    assert "torch" in backends.available_backends()
    name = backends.resolve_backend_name("auto", "cpu")
    cpp_ok = "cpp" in backends.available_backends()
    assert name == ("cpp" if cpp_ok else "torch")


def test_auto_on_cuda_prefers_triton_when_importable():
    if "triton" not in backends.available_backends():
        assert backends.resolve_backend_name("auto", "cuda") == "torch"
    else:
        assert backends.resolve_backend_name("auto", "cuda") == "triton"


def test_global_override_env_and_context_manager(monkeypatch):
    m = ConcatSquashMLP(2, (8,))
    z = torch.randn(4, 2)
    backends.set_backend("torch")
    m(0.0, z)
    assert m.last_backend == "torch" and backends.resolve_backend_name("auto", "cpu") == "torch"
    backends.set_backend(None)
    monkeypatch.setenv("FASTODE_NN_BACKEND", "torch")
    assert backends.get_global_backend() == "torch"
    monkeypatch.setenv("FASTODE_NN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        m(0.0, z)
    monkeypatch.delenv("FASTODE_NN_BACKEND")
    fake = counting_backend("fake")
    backends.register_backend("fake", fake)
    with backends.use_backend("fake"):
        m(0.0, z)
        assert m.last_backend == "fake"
    assert backends.get_global_backend() == "auto"
    assert fake.calls == 1


def test_per_module_backend_wins_over_global():
    fake = counting_backend("fake")
    backends.register_backend("fake", fake)
    m = ConcatSquashMLP(2, (8,), backend="torch")
    with backends.use_backend("fake"):
        m(0.0, torch.randn(3, 2))
    assert m.last_backend == "torch" and fake.calls == 0


def test_registered_backend_is_used_by_auto_and_results_identical():
    fake = counting_backend("cpp")
    backends.register_backend("cpp", fake)  # stands in for the C++ extension
    m = ConcatSquashMLP(3, (8, 8), "swish")
    z = torch.randn(5, 3)
    out = m.forward_with_trace(0.1, z, torch.randn(5, 3))
    assert m.last_backend == "cpp" and fake.calls == 1
    m.backend = "torch"
    e = torch.randn(5, 3)
    a = m.forward_with_trace(0.1, z, e)
    m.backend = "auto"
    b = m.forward_with_trace(0.1, z, e)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert len(out) == 4


def test_unsupported_call_skipped_by_auto_rejected_by_name():
    fake = counting_backend("cpp")
    fake.supports = lambda t, z, params, act: "float16 only" if z.dtype != torch.float16 else None
    backends.register_backend("cpp", fake)
    m = ConcatSquashMLP(2, (8,))
    m(0.0, torch.randn(3, 2))
    assert m.last_backend == "torch" and fake.calls == 0
    m.backend = "cpp"
    with pytest.raises(ValueError, match="float16 only"):
        m(0.0, torch.randn(3, 2))


def test_register_requires_the_three_functions():
    with pytest.raises(ValueError, match="lacks"):
        backends.register_backend("broken", types.SimpleNamespace(concatsquash_mlp=F.concatsquash_mlp))


def test_lazy_backend_import_registers_or_falls_back(monkeypatch):
    modname = "fastode_test_lazy_backend_mod"
    mod = types.ModuleType(modname)
    monkeypatch.setitem(sys.modules, modname, mod)  # imported, but registers nothing
    backends.register_lazy_backend("lazyfake", modname)
    assert "lazyfake" not in backends.available_backends()
    with pytest.raises(ValueError, match="did not register"):
        backends.resolve_backend_name("lazyfake", "cpu")
    backends.register_lazy_backend("lazyfake2", "fastode_no_such_module_xyz")
    with pytest.raises(ValueError, match="importing fastode_no_such_module_xyz failed"):
        backends.get_backend("lazyfake2", "cpu")


def test_triton_by_name_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    if "triton" not in backends.available_backends():
        pytest.skip("triton not importable")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on cuda tensors, not cpu; set TRITON_INTERPRET=1"):
        backends.resolve_backend_name("triton", "cpu")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        ConcatSquashMLP(2, backend="jax")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.set_backend("jax")
