"""Triton kernels of the fused ops (``anyflow.ops`` registers them as the ``"triton"`` backend); imported lazily, never by ``import anyflow``."""
