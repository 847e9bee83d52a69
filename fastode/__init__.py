"""fastode: fused, exact-gradient Runge-Kutta solvers for neural ODEs and CNFs (a drop-in for torchdiffeq)."""
__version__ = "0.1.0"
