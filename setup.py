"""Build script for fastode.

`kernels/` (the Triton kernels) lives at the top of the repository, as in the design card, but ships
inside the package as `fastode.kernels` so that it cannot collide with another top-level `kernels`.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastode", "fastode.*"]) + ["fastode.kernels"]

setup(
    name="fastode",
    version="0.1.0",
    description="Fused, exact-gradient Runge-Kutta solvers for neural ODEs and CNFs; a drop-in for torchdiffeq",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastode.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "scipy", "torchdiffeq==0.2.5", "torchode", "scikit-learn"],
    },
    entry_points={"console_scripts": ["fastode=fastode.__main__:main"]},
)
