"""FAR KV cache: preallocated, post-RoPE keys, one contiguous ``[compressed | full | current]`` buffer.

Layout per layer: ``k[layer]``, ``v[layer]`` are ``[B, H, capacity, Dh]`` views of one allocation.
Tokens ``[0, num_compressed)`` hold the compressed context chunks, ``[num_compressed,
num_compressed + num_full)`` the full-resolution context chunks, and the current chunk is written right
after them at every NFE. Because the three regions are adjacent, attention of the current chunk reads
one strided view (no ``torch.cat``, no copy of the cache).

Keys are stored *after* RoPE: positions are absolute frame indices that never change for a cached
token, so rotating once at write time is exact (the official code stores pre-RoPE keys and re-rotates
the whole cache in float64 at every NFE).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..models.fused import split_chunks


def kv_capacity(chunk_partition: Sequence[int], full_chunk_limit: int, full_tpf: int, compressed_tpf: int) -> int:
    """Largest token count the cache must hold over a whole FAR video (inference NFEs and cache steps)."""
    cp = list(chunk_partition)
    need = 0
    for k in range(len(cp)):
        nc, nf = split_chunks(k + 1, full_chunk_limit)  # inference NFE of chunk k: cache + current
        need = max(need, sum(cp[:nc]) * compressed_tpf + sum(cp[nc : nc + nf]) * full_tpf)
        nc, nf = split_chunks(k + 1, full_chunk_limit - 1)  # cache step after chunk k
        need = max(need, sum(cp[:nc]) * compressed_tpf + sum(cp[nc : k + 1]) * full_tpf)
    return need


class FARKVCache:
    """Preallocated FAR KV cache of every self-attention layer.

    Args:
        num_layers: transformer blocks.
        batch: cache batch (2B with classifier-free guidance).
        heads, head_dim: attention heads and head dim.
        capacity: tokens per layer (see :func:`kv_capacity`).
        dtype, device: storage dtype (the model dtype) and device.

    Attributes:
        k, v: ``[num_layers, batch, heads, capacity, head_dim]``.
        num_compressed, num_full: tokens of cached compressed / full context.
        num_compressed_chunks: chunks held in compressed form (they are final once written).
    """

    def __init__(self, num_layers, batch, heads, head_dim, capacity, dtype, device):
        shape = (num_layers, batch, heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.num_compressed = 0
        self.num_full = 0
        self.num_compressed_chunks = 0

    @property
    def num_cached(self) -> int:
        return self.num_compressed + self.num_full

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``[B, L, H, Dh]`` keys (post-RoPE) and values at tokens ``[start, start + L)``."""
        end = start + k.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: writing tokens up to {end} but capacity is {self.capacity}")
        self.k[layer, :, :, start:end] = k.transpose(1, 2)
        self.v[layer, :, :, start:end] = v.transpose(1, 2)

    def segments(self, layer: int, end: int):
        """Key/value views ``[B, H, L, Dh]`` of the regions in ``[0, end)``: compressed, full, rest."""
        bounds = [0, self.num_compressed, self.num_cached, end]
        ks = [self.k[layer, :, :, a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        vs = [self.v[layer, :, :, a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        return ks, vs
