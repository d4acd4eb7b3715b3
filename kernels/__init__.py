"""Triton kernels of comm_fast (installed as comm_fast.kernels)."""
