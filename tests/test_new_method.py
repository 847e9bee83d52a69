"""A new explicit Runge-Kutta method is one tableau (DESIGN.md, "Where does X go").

A copy of the package gets two tableaus added to ``fastode/tableaus.py`` and nothing else: Ralston's second-order
method (fixed grid) and Heun-Euler under a new name (adaptive: it has an embedded error estimate). In a fresh
process on that copy, each must be a method everywhere: ``odeint`` (against a hand-written Ralston loop, and
step for step against ``adaptive_heun``), the method table's order and metadata, the CNF's fixed-grid methods and
its fused C++ grid engine, the training CLI's choices and the "did you mean" hint.
"""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NEW_TABLEAUS = '''
RALSTON2 = ButcherTableau("ralston2", _t((0, 2 / 3)), ((), _t((2 / 3,))), _t((1 / 4, 3 / 4)), None, 2, False, None,
                          None)
HEUN_EULER = ButcherTableau(**{**ADAPTIVE_HEUN.__dict__, "name": "heun_euler"})

'''

CHECKS = r'''
import torch
import fastode
import fastode.cpp as fc
from fastode import odeint
from fastode.errors import InvalidMethodError
from fastode.flows import CNF, FIXED_GRID_METHODS
from fastode.nn import ConcatSquashMLP
from fastode.solvers import SOLVERS, method_info
from fastode.tableaus import TABLEAUS
from fastode.train import build_parser

assert fastode.__file__.startswith(COPY), fastode.__file__
names = list(SOLVERS)
assert names[:14] == ["dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint",
                      "heun2", "heun3", "rk4", "rk4_classic", "ralston2", "heun_euler"], names
info = method_info("ralston2")
assert info.fixed_grid and not info.adaptive and info.rk_tableau is TABLEAUS["ralston2"]
info = method_info("heun_euler")
assert info.adaptive and not info.fixed_grid and info.options["max_num_steps"] > 0
assert "ralston2" in FIXED_GRID_METHODS and "heun_euler" not in FIXED_GRID_METHODS

# Ralston's method against a hand-written loop, y' = -y t on [0, 1], h = 0.125
f = lambda t, y: -y * t
y0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
h, y, t = 0.125, y0.clone(), 0.0
for _ in range(8):
    k1 = f(t, y)
    k2 = f(t + 2 * h / 3, y + 2 * h / 3 * k1)
    y, t = y + h * (k1 / 4 + 3 * k2 / 4), t + h
got = odeint(f, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="ralston2", options={"step_size": h})
assert torch.allclose(got[-1], y, rtol=1e-14, atol=0), (got[-1], y)

# the adaptive copy takes adaptive_heun's steps exactly
tt = torch.linspace(0, 2, 5, dtype=torch.float64)
a, sa = odeint(f, y0, tt, method="heun_euler", rtol=1e-6, atol=1e-8, return_stats=True)
b, sb = odeint(f, y0, tt, method="adaptive_heun", rtol=1e-6, atol=1e-8, return_stats=True)
assert torch.equal(a, b) and sa.num_fevals == sb.num_fevals and sa.step_sizes == sb.step_sizes

# the CNF runs it on its fused C++ grid engine, which reads the tableau
torch.manual_seed(0)
cnf = CNF(ConcatSquashMLP(2, (8,), "tanh"), T=0.5, method="ralston2", step_size=0.1).double()
x, e = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
out = cnf(x, noise=e)
assert cnf.last_solve.engine == ("cpp_grid" if fc.available() else "odeint"), cnf.last_solve.describe()
cnf.fused_cpu = False
ref = cnf(x, noise=e)
assert cnf.last_solve.engine == "odeint"
assert torch.allclose(out.out, ref.out, rtol=1e-12, atol=1e-12)
assert torch.allclose(out.logdet, ref.logdet, rtol=1e-12, atol=1e-12)

# the training CLI offers it, and a mis-cased name is pointed at it
assert build_parser().parse_args(["--method", "ralston2"]).method == "ralston2"
try:
    odeint(f, y0, tt, method="Ralston2")
except InvalidMethodError as exc:
    assert "Did you mean 'ralston2'?" in str(exc), str(exc)
else:
    raise AssertionError("a mis-cased method name must raise")
print("ok")
'''


def test_a_new_tableau_is_a_method_everywhere(tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(ROOT / "fastode", copy / "fastode", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", copy / "fastode" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    tableaus = copy / "fastode" / "tableaus.py"
    src = tableaus.read_text()
    anchor = "TABLEAUS: Dict[str, ButcherTableau] = {"
    listed = "RK4_CLASSIC)"
    assert src.count(anchor) == 1 and src.count(listed) == 1, "tableaus.py changed shape: update this test"
    src = src.replace(anchor, NEW_TABLEAUS + anchor).replace(listed, "RK4_CLASSIC, RALSTON2, HEUN_EULER)")
    tableaus.write_text(src)
    code = f"COPY = {str(copy)!r}\n" + CHECKS
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
