"""Triton kernels, one module per family (installed as ``lowrank_ops.kernels``)."""
