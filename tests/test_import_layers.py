"""The package's layers, read from its source with ``ast``: no import cycles, and the lower layers never import the
higher ones (the ops layer is the bottom; the solver core never imports the models; the C++ and Triton packages only
the ops; the kernels, ``kernels/`` shipped as ``fastode.kernels``, only each other and the bottom modules).

Function-level (lazy) imports count: they are dependencies too. Cycles are checked on module-level imports (what
runs at import time, where a cycle breaks or half-initialises a module) and on all imports.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fastode"
KERNELS = ROOT.parent / "kernels"  # installed as fastode.kernels (setup.py's package_dir)


def _module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ["fastode", "kernels"] + list(path.relative_to(KERNELS).with_suffix("").parts)
    else:
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    names = [base]
    if node.module is None or node.level:  # "from . import x" may import submodule x
        names += [f"{base}.{a.name}" for a in node.names]
    return names


def _imports():
    """module -> (module-level imports, all imports), restricted to fastode modules that exist."""
    files = {(_module_name(p)): p for p in list(ROOT.rglob("*.py")) + list(KERNELS.rglob("*.py"))}
    out = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        top, every = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = _resolve(mod, is_pkg, node)
            else:
                continue
            names = {n for n in names if n in files and n != mod}
            every |= names
        for node in tree.body:  # module level, including under top-level if / try
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for n in ast.walk(node):
                if isinstance(n, ast.Import):
                    top |= {a.name for a in n.names if a.name in files and a.name != mod}
                elif isinstance(n, ast.ImportFrom):
                    top |= {x for x in _resolve(mod, is_pkg, n) if x in files and x != mod}
        out[mod] = (top, every)
    return out


IMPORTS = _imports()


@pytest.mark.parametrize("which", ["module-level", "all"])
def test_no_import_cycles(which):
    # edges to a module's own ancestor packages are left out: "from . import x" runs inside the package's init
    graph = {m: {n for n in (top if which == "module-level" else every) if not m.startswith(n + ".")}
             for m, (top, every) in IMPORTS.items()}
    seen, stack, cycles = set(), [], []

    def visit(m, on_path):
        if m in on_path:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.add(m)
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            visit(n, on_path)
        stack.pop()
        on_path.discard(m)

    for m in sorted(graph):
        visit(m, set())
    assert not cycles, f"import cycles: {cycles}"


_APPS = ("fastode.train", "fastode.demo", "fastode.apps")
_BACKENDS = ("fastode.cpp", "fastode.triton", "fastode.kernels")
_ABOVE_BOTTOM = ("fastode.ops", "fastode.solvers", "fastode.nn", "fastode.flows", "fastode.grad", "fastode.odeint",
                 "fastode.driver", "fastode.inputs", "fastode.tableaus", "fastode.compiling") + _BACKENDS + _APPS
LOWER = {
    "fastode.codes": _ABOVE_BOTTOM,
    "fastode.launch_count": _ABOVE_BOTTOM,
    "fastode.ops": ("fastode.solvers", "fastode.nn", "fastode.flows", "fastode.grad", "fastode.odeint",
                    "fastode.driver", "fastode.compiled") + _BACKENDS + _APPS,
    "fastode.solvers": ("fastode.nn", "fastode.flows", "fastode.compiled") + _BACKENDS + _APPS,
    "fastode.grad": ("fastode.nn", "fastode.flows") + _BACKENDS + _APPS,
    "fastode.cpp": ("fastode.nn", "fastode.flows", "fastode.solvers", "fastode.grad", "fastode.triton",
                    "fastode.kernels") + _APPS,
    "fastode.triton": ("fastode.nn", "fastode.flows", "fastode.solvers", "fastode.grad", "fastode.cpp") + _APPS,
    "fastode.nn": ("fastode.flows", "fastode.solvers") + _APPS,
    # the compiled engine restates the solver loops: it reads the solvers and the RK spec, never the public API
    # above it (odeint, odeint_adjoint import it lazily), the models or the native backends
    "fastode.compiled": ("fastode.odeint", "fastode.grad.adjoint", "fastode.nn", "fastode.flows") + _BACKENDS
    + _APPS,
}

#: what the kernels may import: each other and the bottom modules (the tableaus and codes they take constants from,
#: the launch counter)
KERNEL_DEPS = ("fastode.kernels", "fastode.tableaus", "fastode.codes", "fastode.launch_count")


@pytest.mark.parametrize("layer", sorted(LOWER))
def test_lower_layers_do_not_import_higher_ones(layer):
    bad = []
    for mod, (_, every) in IMPORTS.items():
        if mod == layer or mod.startswith(layer + "."):
            bad += [(mod, n) for n in every if any(n == h or n.startswith(h + ".") for h in LOWER[layer])]
    assert not bad, f"{layer} imports a higher layer: {sorted(bad)}"


def test_the_kernels_import_only_kernels_and_the_bottom():
    """kernels/ holds kernels and their one-launch launchers: no solver, no autograd Function, no model; and nothing
    it imports imports it back (no two-way dependency between packages)."""
    bad = [(mod, n) for mod, (_, every) in IMPORTS.items() if mod.startswith("fastode.kernels")
           for n in every if not any(n == k or n.startswith(k + ".") for k in KERNEL_DEPS)]
    assert not bad, f"kernels import outside their layer: {sorted(bad)}"
    assert "fastode.kernels.cnf_step" in IMPORTS["fastode.kernels.cnf_solve"][0]  # the checker reads kernels/


def test_the_library_never_imports_the_applications():
    """fastode.apps (train, demo, plots) sits above the library: only its aliases and the command entry point import
    it."""
    entry = {"fastode.train", "fastode.demo", "fastode.plots", "fastode.__main__"}
    bad = [(mod, n) for mod, (_, every) in IMPORTS.items()
           if not (mod == "fastode.apps" or mod.startswith("fastode.apps.")) and mod not in entry
           for n in every if n == "fastode.apps" or n.startswith("fastode.apps.")]
    assert not bad, f"library modules import the applications: {sorted(bad)}"
    assert "fastode.apps.train" in IMPORTS["fastode.apps.demo"][0]  # the checker sees the applications' imports


def test_the_checker_sees_imports():
    """The parser finds known edges (so that the tests above cannot pass by seeing nothing)."""
    assert "fastode.ops.registry" in IMPORTS["fastode.ops.rk"][0]
    assert "fastode.ops.concatsquash" in IMPORTS["fastode.cpp._mlp"][0]
    assert "fastode.flows.engines" in IMPORTS["fastode.flows.cnf"][0]
    assert "fastode.cpp" in IMPORTS["fastode.flows.fused.cpp"][1]  # a lazy (function-level) import
    assert "fastode.kernels.cnf_solve" in IMPORTS["fastode.flows.fused.triton"][1]
