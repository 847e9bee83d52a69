"""Build script for fastode.

`kernels/` (the Triton kernels) lives at the top of the repository, as in the design card, but ships
inside the package as `fastode.kernels` so that it cannot collide with another top-level `kernels`.

The C++ CPU backend (`csrc/` -> extension `fastode._C`) is optional:

* it is built with torch's `BuildExtension` (ninja when installed) when torch is importable at build
  time, i.e. with `pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace`;
* if torch is missing, a compiler is missing or the compile fails, setup prints why and installs the
  pure-Python package; fastode then uses the PyTorch reference on the CPU (`fastode.cpp.build_info()`
  says which);
* `FASTODE_NO_EXT=1` skips the build on purpose; `FASTODE_REQUIRE_EXT=1` makes a failed build an error
  (CI: csrc/ci_build_and_test.sh).

Flags: `-O3`, OpenMP, no `-march`: the element-wise loops carry GCC `target_clones` (x86-64-v4, v3,
baseline) picked at load time, the AVX-512 micro-kernels are compiled with a `target` attribute and only
called when the CPU has AVX-512 (checked at run time), and the other GEMMs go to the MKL inside libtorch,
so one build runs on any x86-64 CPU. `FASTODE_NATIVE=1` adds `-march=native` for a local, non-portable
build.
"""
import os
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["fastode", "fastode.*"]) + ["fastode.kernels"]

# the torch-free core, one translation unit per concern (csrc/README.md; CMakeLists.txt compiles the same list),
# and the torch bindings; ninja compiles them in parallel and, with the build directory kept, only what changed
EXT_SOURCES = ["csrc/activations.cpp", "csrc/gemm.cpp", "csrc/mlp.cpp", "csrc/cnf_step.cpp",
               "csrc/cnf_grid.cpp", "csrc/cnf_adaptive.cpp", "csrc/pool.cpp", "csrc/bindings.cpp"]


REQUIRE_EXT = os.environ.get("FASTODE_REQUIRE_EXT", "0") not in ("", "0")


def _ext_message(msg: str) -> None:
    if REQUIRE_EXT:
        raise RuntimeError(f"fastode: {msg} (FASTODE_REQUIRE_EXT is set)")
    bar = "=" * 78
    sys.stderr.write(f"\n{bar}\nfastode: {msg}\nfastode: installing the pure-Python package; the CPU backend will be "
                     f"the PyTorch reference.\n{bar}\n\n")


def _extension_setup():
    """(ext_modules, cmdclass) for the C++ extension, or ([], {}) when it cannot be built."""
    if os.environ.get("FASTODE_NO_EXT", "0") not in ("", "0"):
        _ext_message("FASTODE_NO_EXT is set: not building the C++ extension.")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch absent at build time (e.g. build isolation)
        _ext_message(f"torch is not importable at build time ({exc}); to build the C++ backend install torch "
                     "first and use `pip install --no-build-isolation -e .`.")
        return [], {}

    # as torch itself: no errno / FP-trap semantics, so that selects and libm-free math vectorise
    cflags = ["-O3", "-g0", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-DNDEBUG"]
    if os.environ.get("FASTODE_NATIVE", "0") not in ("", "0"):
        cflags.append("-march=native")
    ext = CppExtension(
        "fastode._C",
        EXT_SOURCES,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cflags},
        extra_link_args=["-fopenmp", "-ldl"],
    )

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that reports a failed compile instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # no compiler, compile error, ...
                if REQUIRE_EXT:
                    raise
                _ext_message(f"building the C++ extension failed: {type(exc).__name__}: {exc}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if REQUIRE_EXT:
                    raise
                _ext_message(f"building the C++ extension {ext.name} failed: {type(exc).__name__}: {exc}")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_setup()

_PLOTS = ["matplotlib"]
_DATA = ["scikit-learn"]  # the sklearn toy sets (swissroll, circles, moons, rings) and digits/breast_cancer
_PROGRESS = ["tqdm"]
_DEMO = _PROGRESS + _PLOTS + _DATA + ["torchdiffeq==0.2.5"]  # torchdiffeq: the demo's peer
_EXPORT = ["onnx", "onnxscript", "onnxruntime"]  # fastode.flows.export_flow to ONNX, and running it
EXTRAS = {
    "plots": _PLOTS,
    "data": _DATA,
    "progress": _PROGRESS,
    "scipy": ["scipy"],  # method="scipy_solver"
    "demo": _DEMO,
    # Triton serves on CUDA machines and runs the kernel tests in its interpreter; it is not in "test"
    # so that the tests run (skipping the Triton tiers) where it cannot be installed.
    "triton": ["triton"],
    "export": _EXPORT,
    "test": _DEMO + _EXPORT + ["scipy", "pytest", "pytest-benchmark", "torchode", "hypothesis"],
}

setup(
    name="fastode",
    version="0.1.0",
    description="Fused, exact-gradient Runge-Kutta solvers for neural ODEs and CNFs; a drop-in for torchdiffeq",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastode.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # Core: the solvers, CNFs and the C++ backend need only torch and numpy. Everything else is imported
    # lazily where it serves and comes with an extra.
    install_requires=["torch>=2.4", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fastode=fastode.__main__:main"]},
)
