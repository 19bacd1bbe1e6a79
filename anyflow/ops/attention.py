"""FAR attention: a query chunk over a segmented KV, and the chunk-causal masked form.

Layouts are ``[B, H, L, D]`` (heads before tokens, as the KV cache stores them); softmax scale
``1/sqrt(D)`` unless given.

*Segmented KV.* At a FAR inference step the current chunk attends, without mask, to the compressed
cache, the full cache and itself. :func:`segmented_attention` takes those as separate tensors and never
concatenates them: segments that are adjacent views of one buffer (how
:class:`anyflow.models.far.FARKVCache` lays them out) are read as one strided view; otherwise the
partial results are merged through their log-sum-exp.

*Chunk-causal.* The FAR cache step and FAR training use a block mask over chunks (the official code's
``build_block_mask``, ``NVlabs/AnyFlow`` ``far/models/transformer_far_wan_model.py``).
Every query chunk attends to a few contiguous key ranges, so the mask is a table of ranges
(:class:`AttentionLayout`), built from the chunk partition by :func:`far_attention_layout` - never a
dense ``Q x K`` mask. Training adds *clean copies* of the noisy chunks: context is chunk-causal among
itself; a clean copy sees the context and the clean copies of chunks up to its own; a noisy chunk sees
the context, the clean copies of strictly earlier chunks, and itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import registry
from ._checks import check_int, check_number, check_same_device, check_tensor
from .sdpa import sdpa

Range = tuple[int, int]


@dataclass(frozen=True)
class AttentionLayout:
    """Block-sparse attention pattern as ranges.

    Attributes:
        q_len: number of query tokens.
        kv_len: number of key tokens.
        groups: ``((q_start, q_end, ((k_start, k_end), ...)), ...)``: queries in ``[q_start, q_end)``
            attend exactly to the union of the key ranges, which are sorted and disjoint (the layout
            builders merge touching ranges). Groups tile ``[0, q_len)``.
    """

    q_len: int
    kv_len: int
    groups: tuple[tuple[int, int, tuple[Range, ...]], ...]

    def dense_mask(self, device=None) -> torch.Tensor:
        """``[q_len, kv_len]`` boolean mask (True = attend); for tests and debugging only."""
        mask = torch.zeros(self.q_len, self.kv_len, dtype=torch.bool, device=device)
        for qs, qe, ranges in self.groups:
            for ks, ke in ranges:
                mask[qs:qe, ks:ke] = True
        return mask


def chunk_causal_layout(
    chunk_tokens: Sequence[int], num_context_chunks: int = 0, clean_copy: bool = False, kv_offset: int = 0
) -> AttentionLayout:
    """Layout of the FAR chunk-causal mask over a sequence of chunks.

    Args:
        chunk_tokens: tokens of each chunk in sequence order (context chunks first).
        num_context_chunks: how many leading chunks are (clean) context; only used with ``clean_copy``.
        clean_copy: the sequence continues with a clean copy of every non-context chunk (training).
        kv_offset: extra key tokens that precede the sequence in the key tensor and that every query
            may see (an already cached prefix, e.g. the compressed cache during an incremental cache
            step). Query indices are not shifted.

    Returns:
        :class:`AttentionLayout` with ``q_len = sum(chunk_tokens) (+ clean copies)``.

    Raises:
        ValueError / TypeError: chunk sizes that are not positive ints, a negative ``kv_offset`` or more
            context chunks than chunks.
    """
    toks = _positive_ints("chunk_tokens", chunk_tokens)
    num_context_chunks = check_int("num_context_chunks", num_context_chunks)
    kv_offset = check_int("kv_offset", kv_offset, minimum=0)
    if not 0 <= num_context_chunks <= len(toks):
        raise ValueError(f"num_context_chunks must be in [0, {len(toks)}] (chunks in chunk_tokens), got {num_context_chunks}")
    starts = [sum(toks[:i]) for i in range(len(toks))]
    ends = [s + n for s, n in zip(starts, toks)]
    total = sum(toks)
    o = kv_offset
    groups = []
    if not clean_copy:
        for s, e in zip(starts, ends):
            groups.append((s, e, ((0, o + e),)))
        return AttentionLayout(total, o + total, tuple(groups))
    nc = num_context_chunks
    ctx_end = ends[nc - 1] if nc else 0
    clean_start = total
    clean_ends = {}
    c_pos = clean_start
    for j in range(nc, len(toks)):
        c_pos += toks[j]
        clean_ends[j] = c_pos
    for j in range(nc):
        groups.append((starts[j], ends[j], ((0, o + ends[j]),)))
    for j in range(nc, len(toks)):
        ranges = [(0, o + ctx_end)] if o + ctx_end > 0 else []
        prev_clean_end = clean_ends[j - 1] if j > nc else clean_start
        if prev_clean_end > clean_start:
            ranges.append((o + clean_start, o + prev_clean_end))
        ranges.append((o + starts[j], o + ends[j]))
        groups.append((starts[j], ends[j], tuple(_merge(ranges))))
    for j in range(nc, len(toks)):
        cs = clean_ends[j] - toks[j]
        ranges = [(0, o + ctx_end)] if o + ctx_end > 0 else []
        ranges.append((o + clean_start, o + clean_ends[j]))
        groups.append((cs, clean_ends[j], tuple(_merge(ranges))))
    q_len = c_pos
    return AttentionLayout(q_len, o + q_len, tuple(groups))


def _positive_ints(name: str, values) -> list[int]:
    """A non-empty sequence of positive ints, or a ValueError / TypeError naming ``name``."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of positive ints, got {type(values).__name__} {values!r}")
    out = [check_int(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if not out or any(v <= 0 for v in out):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {out}")
    return out


def _merge(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def far_attention_layout(
    chunk_partition: Sequence[int],
    num_compressed_chunks: int,
    full_tokens_per_frame: int,
    compressed_tokens_per_frame: int,
    clean_copy: bool = False,
) -> AttentionLayout:
    """Chunk-causal layout of a FAR sequence ``[compressed chunks | full chunks (| clean copies)]``.

    Args:
        chunk_partition: latent frames per chunk, e.g. ``[1, 3, 3, 3, 3, 3, 3, 2]``.
        num_compressed_chunks: leading chunks embedded with the compressed patch (context).
        full_tokens_per_frame, compressed_tokens_per_frame: ``(H/2)(W/2)`` and ``(H/4)(W/4)`` at Wan's
            patch sizes.
        clean_copy: training form with clean copies of the full chunks; context = compressed chunks.

    Raises:
        ValueError / TypeError: ``num_compressed_chunks`` outside ``[0, len(chunk_partition)]``, chunk
            sizes or tokens per frame that are not positive ints.
    """
    cp = _positive_ints("chunk_partition", chunk_partition)
    full_tokens_per_frame = check_int("full_tokens_per_frame", full_tokens_per_frame, minimum=1)
    compressed_tokens_per_frame = check_int("compressed_tokens_per_frame", compressed_tokens_per_frame, minimum=1)
    num_compressed_chunks = check_int("num_compressed_chunks", num_compressed_chunks)
    if not 0 <= num_compressed_chunks <= len(cp):
        raise ValueError(f"num_compressed_chunks must be in [0, {len(cp)}], got {num_compressed_chunks}")
    toks = [
        c * (compressed_tokens_per_frame if i < num_compressed_chunks else full_tokens_per_frame)
        for i, c in enumerate(cp)
    ]
    return chunk_causal_layout(toks, num_context_chunks=num_compressed_chunks, clean_copy=clean_copy)


# ----------------------------------------------------------------------------------------------
# segmented attention
# ----------------------------------------------------------------------------------------------
def _adjacent_view(parts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """One strided view over ``parts`` if they are consecutive token ranges of one buffer, else None."""
    first = parts[0]
    if len(parts) == 1:
        return first
    stride = first.stride()
    offset = first.storage_offset()
    ptr = first.untyped_storage().data_ptr()
    total = 0
    for p in parts:
        if (
            p.untyped_storage().data_ptr() != ptr
            or p.stride() != stride
            or p.shape[:2] != first.shape[:2]
            or p.shape[3] != first.shape[3]
            or p.storage_offset() != offset + total * stride[2]
        ):
            return None
        total += p.shape[2]
    size = (first.shape[0], first.shape[1], total, first.shape[3])
    return first.as_strided(size, stride, offset)


def _attention_with_lse(q, k, v, scale, block: int = 1024):
    """Softmax attention and its log-sum-exp, in fp32, blocked over queries to bound memory."""
    outs, lses = [], []
    for s in range(0, q.shape[2], block):
        qs = q[:, :, s : s + block].float()
        logits = torch.matmul(qs, k.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.matmul(torch.exp(logits - lse[..., None]), v.float()))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


registry.describe("segmented_attention", lambda q, keys, values, *args: registry.call_of(
    q, (q, *keys, *values), head_dim=q.shape[-1], segments=sum(1 for k in keys if k.shape[2]), segment_kind="KV",
    batch_heads=q.shape[0] * q.shape[1]))


@registry.register("segmented_attention", "torch")
def _segmented_attention_torch(q, keys, values, scale, return_lse):
    if not return_lse:
        k = _adjacent_view(keys)
        v = _adjacent_view(values)
        if k is not None and v is not None:
            return sdpa(q, k, v, scale=scale)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, *keys, *values)):
            # training (the on-policy rollout's gradient-keeping snapshot): one SDPA over the concatenated
            # segments keeps memory linear in the keys; the log-sum-exp merge below would keep fp32 logits
            return sdpa(q, torch.cat(list(keys), dim=2), torch.cat(list(values), dim=2), scale=scale)
    out = lse = None
    for k, v in zip(keys, values):
        if k.shape[2] == 0:
            continue
        o_i, l_i = _attention_with_lse(q, k, v, scale)
        if out is None:
            out, lse = o_i, l_i
            continue
        new_lse = torch.logaddexp(lse, l_i)
        out = out * torch.exp(lse - new_lse)[..., None] + o_i * torch.exp(l_i - new_lse)[..., None]
        lse = new_lse
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def segmented_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Unmasked attention of ``q`` over the union of several KV segments, without concatenating them.

    Args:
        q: ``[B, H, Lq, D]`` queries (RoPE applied).
        keys, values: equally long sequences of ``[B, H, Lk_i, D]`` tensors (e.g. compressed cache,
            full cache, current chunk). Empty segments are allowed; at least one key in total.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the ``[B, H, Lq]`` fp32 log-sum-exp (natural log), as ring /
            context-parallel attention needs.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default).

    Returns:
        ``[B, H, Lq, D]`` in ``q.dtype`` (and the LSE when asked).

    Raises:
        ValueError / TypeError: mismatched shapes, dtypes or devices; no keys.

    Source: the mask-free KV-cache inference step of the official FAR code (diffusers
    ``AnyFlowCausalAttnProcessor`` without its zero padding, see the README).
    """
    check_tensor("q", q, ndim=4)
    keys, values = list(keys), list(values)
    if len(keys) != len(values) or not keys:
        raise ValueError(f"keys and values must be non-empty and of equal length, got {len(keys)} and {len(values)}")
    for i, (k, v) in enumerate(zip(keys, values)):
        check_tensor(f"keys[{i}]", k, ndim=4)
        check_tensor(f"values[{i}]", v, ndim=4)
        if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
            raise ValueError(
                f"keys[{i}]/values[{i}] must be [B, H, L, D] with B, H, D of q {tuple(q.shape)}, got "
                f"{tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"keys[{i}]/values[{i}] must have q's dtype {q.dtype}, got {k.dtype}/{v.dtype}")
        check_same_device(q=q, **{f"keys[{i}]": k, f"values[{i}]": v})
    if sum(k.shape[2] for k in keys) == 0:
        raise ValueError(f"keys must hold at least one key in total, got lengths {[k.shape[2] for k in keys]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_number("scale", scale)
    return registry.dispatch(
        "segmented_attention", backend, q.device.type, q, tuple(keys), tuple(values), scale, bool(return_lse)
    )


@functools.lru_cache(maxsize=256)
def _check_layout(layout: AttentionLayout) -> None:
    """The groups tile ``[0, q_len)`` in order; each has sorted, disjoint, non-empty key ranges inside
    ``[0, kv_len)``. (The builders guarantee it; a hand-made layout is checked once per process.)"""
    at = 0
    for qs, qe, ranges in layout.groups:
        if qs != at or qe <= qs:
            raise ValueError(f"layout groups must tile [0, {layout.q_len}) in order; a group covers [{qs}, {qe}) "
                             f"where [{at}, ...) comes next")
        if not ranges:
            raise ValueError(f"layout group [{qs}, {qe}) has no key range (its queries would attend to nothing)")
        end = 0
        for ks, ke in ranges:
            if ks < end or ke <= ks or ke > layout.kv_len:
                raise ValueError(f"layout group [{qs}, {qe}) has key ranges {list(ranges)}; expected sorted, disjoint, "
                                 f"non-empty ranges inside [0, {layout.kv_len})")
            end = ke
        at = qe
    if at != layout.q_len:
        raise ValueError(f"layout groups cover [0, {at}) of the {layout.q_len} queries")


registry.describe("chunk_causal_attention", lambda q, k, v, *args: registry.call_of(
    q, (q, k, v), head_dim=q.shape[-1], batch_heads=q.shape[0] * q.shape[1]))


def flat_layout(layout: AttentionLayout) -> list[int]:
    """``[q_start, q_end, R, k_start_1, k_end_1, ..., k_start_R, k_end_R]`` per group: how an op schema
    (``int[]``) carries a layout to the kernels of both backends. Plain loops: torch.compile folds them."""
    flat = []
    for qs, qe, ranges in layout.groups:
        flat += [int(qs), int(qe), len(ranges)]
        for ks, ke in ranges:
            flat += [int(ks), int(ke)]
    return flat


@registry.register("chunk_causal_attention", "torch")
def _chunk_causal_attention_torch(q, k, v, layout, scale, return_lse):
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    for qs, qe, ranges in layout.groups:
        if len(ranges) == 1:
            (a, b), = ranges
            kg, vg = k[:, :, a:b], v[:, :, a:b]
        else:  # a few disjoint key ranges (training with clean copies): gather them, small next to Q x K
            kg = torch.cat([k[:, :, a:b] for a, b in ranges], dim=2)
            vg = torch.cat([v[:, :, a:b] for a, b in ranges], dim=2)
        if return_lse:
            o, lse[:, :, qs:qe] = _attention_with_lse(q[:, :, qs:qe], kg, vg, scale)
            out[:, :, qs:qe] = o.to(q.dtype)
        else:
            out[:, :, qs:qe] = sdpa(q[:, :, qs:qe], kg, vg, scale=scale)
    return (out, lse) if return_lse else out


def chunk_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: AttentionLayout,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Attention under a FAR chunk-causal (block-sparse) pattern given as ranges.

    Args:
        q: ``[B, H, Lq, D]``; ``k``, ``v``: ``[B, H, Lk, D]`` (RoPE applied to q and k).
        layout: :class:`AttentionLayout` with ``q_len == Lq`` and ``kv_len == Lk``, usually from
            :func:`far_attention_layout` or :func:`chunk_causal_layout`.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the ``[B, H, Lq]`` fp32 log-sum-exp.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default).

    Returns:
        ``[B, H, Lq, D]`` in ``q.dtype`` (and the LSE when asked).

    Raises:
        ValueError / TypeError: mismatched shapes, dtypes or devices, a layout of other lengths, or
            one whose groups do not tile the queries or whose key ranges are unsorted, overlapping,
            empty or out of bounds.

    Source: the FAR cache step and training mask (diffusers ``_build_far_block_mask_from_far_cfg``,
    without the padding to 128 that only the flex block size needs).
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    if not isinstance(layout, AttentionLayout):
        raise TypeError(f"layout must be an AttentionLayout, got {type(layout).__name__}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k/v must be [B, H, Lk, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if layout.q_len != q.shape[2] or layout.kv_len != k.shape[2]:
        raise ValueError(
            f"layout is for {layout.q_len} queries x {layout.kv_len} keys, got {q.shape[2]} x {k.shape[2]}"
        )
    # cached per layout in eager; a trace checks the (constant) layout once, uncached
    (_check_layout.__wrapped__ if torch.compiler.is_compiling() else _check_layout)(layout)
    check_same_device(q=q, k=k, v=v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_number("scale", scale)
    return registry.dispatch(
        "chunk_causal_attention", backend, q.device.type, q, k, v, layout, scale, bool(return_lse)
    )
