"""Gradient modes: checkpoint (discrete adjoint with recomputation) and adjoint (continuous)."""
