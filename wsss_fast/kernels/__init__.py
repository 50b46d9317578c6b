"""Triton kernel bodies, one file per op (nothing of the package is imported here)."""
