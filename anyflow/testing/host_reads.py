"""Count device -> host reads: the calls that are a host sync on a GPU, visible on any device."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Dispatch mode counting ``aten._local_scalar_dense`` calls (``.item()``, ``bool(t)``, ``int(t)``,
    ``float(t)`` on a tensor): each one waits for the device on CUDA.

    Example:
        >>> with HostReads() as reads:
        ...     torch.randn(3).sum().item()
        >>> reads.count
        1
    """

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
