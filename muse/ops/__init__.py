"""Kernels, one folder per op: each fast path beside the plain reference that defines it."""
