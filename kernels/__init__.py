"""Triton kernels, installed as ``anyflow.kernels``; imported lazily; never imported by ``import anyflow``."""
