"""``import fastode`` stays light: no ``torch._dynamo``, inductor or Triton until a compiled or Triton path runs.

``torch._dynamo`` alone costs over a second at import (more than fastode's own modules together); a drop-in user who
never compiles must not pay it. Checked in a fresh interpreter, after an eager solve of each kind too.
"""
import subprocess
import sys

import torch

from fastode.compiling import constant_result

HEAVY = ("torch._dynamo", "torch._inductor", "triton")


def _loaded_after(code: str) -> list:
    probe = code + f"\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return [m for m in line.split(",") if m]


def test_import_fastode_loads_no_compiler():
    assert _loaded_after("import fastode, fastode.flows, fastode.nn, fastode.grad") == []


def test_eager_solves_load_no_compiler():
    code = """
import torch, fastode
f = lambda t, y: -y
t = torch.linspace(0, 1, 3)
fastode.odeint(f, torch.ones(3), t)
fastode.odeint(f, torch.ones(3), t, method="rk4", options={"step_size": 0.1})
y0 = torch.ones(3, requires_grad=True)
fastode.odeint(f, y0, t, gradient="checkpoint", adjoint_params=()).sum().backward()
fastode.odeint_adjoint(f, y0, t, adjoint_params=()).sum().backward()
"""
    assert _loaded_after(code) == []


def test_constant_result_marks_as_torch_does():
    """fastode marks its traced-constant functions itself (to avoid importing dynamo); the mark must be the one
    ``torch.compiler.assume_constant_result`` sets, or compiled solves would trace the host reads instead."""

    def theirs():
        return 1

    def ours():
        return 1

    marked = torch.compiler.assume_constant_result(theirs)
    added = {k: v for k, v in vars(marked).items()}
    assert added, "torch's decorator no longer marks the function: update fastode.compiling.constant_result"
    assert vars(constant_result(ours)) == added
