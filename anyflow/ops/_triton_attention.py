"""Triton backend of :func:`~anyflow.ops.segmented_attention` and :func:`~anyflow.ops.chunk_causal_attention`.

The kernels live in :mod:`anyflow.kernels.attention`, imported lazily so that this module (and with it
``import anyflow.ops``) works without Triton. The ops are ``torch.library`` custom ops so that
``torch.compile`` and autograd see them:

* ``anyflow::triton_segmented_attention(Tensor q, Tensor[] keys, Tensor[] values, float scale)
  -> (Tensor out, Tensor lse)``: forward only (FAR inference).
* ``anyflow::triton_chunk_causal_attention(Tensor q, Tensor k, Tensor v, SymInt[] layout, float scale)
  -> (Tensor out, Tensor lse)``, differentiable in q, k, v (and through lse) via
* ``anyflow::triton_chunk_causal_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out,
  Tensor lse, Tensor dout, Tensor? dlse, SymInt[] layout, float scale) -> (Tensor dq, Tensor dk, Tensor dv)``.

The :class:`~anyflow.ops.AttentionLayout` travels as a flat list of ints (:func:`encode_layout`), which
is what an op schema can carry (``SymInt[]``: torch infers that from ``list[int]``, for ``triton_op``
too; the values are plain Python ints from the layout, but torch.compile with dynamic shapes hands the
bodies SymInts, which :func:`decode_layout` specializes); the kernels' program tables are built from it
and cached per (layout, block size, device).

On a GPU the ops are ``torch.library.triton_op`` s, so Inductor traces into the kernels. Under the
Triton CPU interpreter (``TRITON_INTERPRET=1``) that cannot work: ``wrap_triton`` hands back the raw
interpreted kernel, which then runs on the fake tensors of the trace and fails ("Cannot access data
pointer of Tensor"). There the same bodies are registered as opaque ``torch.library.custom_op`` s with
explicit fake implementations, which opcheck, autograd and torch.compile handle like any other op.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

from ..kernels.limits import MAX_BATCH_HEADS, MAX_HEAD_DIM, MAX_SEGMENTS
from . import registry

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# triton_op needs triton at definition time (it scans the body for kernels); without triton the ops
# can never run, so the opaque registration keeps `import anyflow.ops` quiet and triton-free.
_TRITON_OP = not _INTERPRET and _triton_installed()


def _kernels():
    from anyflow.kernels import attention

    return attention


# ------------------------------------------------------------------------------------------------
# layout <-> int[]
# ------------------------------------------------------------------------------------------------
def encode_layout(layout) -> list[int]:
    """``[q_len, kv_len, G, (q_start, q_end, R, k_start_0, k_end_0, ..., k_start_R-1, k_end_R-1) x G]``."""
    flat = [layout.q_len, layout.kv_len, len(layout.groups)]
    for qs, qe, ranges in layout.groups:
        flat += [qs, qe, len(ranges)]
        for ks, ke in ranges:
            flat += [ks, ke]
    return flat


def decode_layout(flat) -> tuple[int, int, tuple]:
    """Inverse of :func:`encode_layout`: ``(q_len, kv_len, groups)`` with hashable ``groups``.

    Under torch.compile with dynamic shapes the values arrive as SymInts (unhashable): ``int()``
    specializes them (the program tables need concrete values anyway) before the cached decode.
    """
    return _decode_layout(tuple(int(x) for x in flat))


@functools.lru_cache(maxsize=256)
def _decode_layout(flat: tuple) -> tuple[int, int, tuple]:
    flat = list(flat)
    q_len, kv_len, n = flat[:3]
    groups, i = [], 3
    for _ in range(n):
        qs, qe, r = flat[i : i + 3]
        groups.append((qs, qe, tuple((flat[i + 3 + 2 * j], flat[i + 4 + 2 * j]) for j in range(r))))
        i += 3 + 2 * r
    return q_len, kv_len, tuple(groups)


# ------------------------------------------------------------------------------------------------
# op bodies (shared by the triton_op and custom_op registrations)
# ------------------------------------------------------------------------------------------------
def _alloc_fwd(q):
    # empty_like keeps q's memory layout (e.g. [B, L, H, D] viewed as [B, H, L, D]), so the output
    # can be viewed back without a copy; the kernels take strides.
    return torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


def _segmented_body(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _alloc_fwd(q)
    _kernels().segmented_attention_fwd(q, keys, values, scale, out=out, lse=lse)
    return out, lse


def _segmented_fake(q, keys, values, scale):
    return _alloc_fwd(q)


def _chunk_body(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: list[int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _alloc_fwd(q)
    _kernels().chunk_causal_fwd(q, k, v, decode_layout(layout)[2], scale, out=out, lse=lse)
    return out, lse


def _chunk_fake(q, k, v, layout, scale):
    return _alloc_fwd(q)


def _chunk_bwd_body(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dout: torch.Tensor, dlse: Optional[torch.Tensor], layout: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if dout.stride(-1) != 1:  # e.g. the expanded gradient of a sum(); the kernels need a unit D stride
        dout = dout.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _kernels().chunk_causal_bwd(q, k, v, out, lse, dout, dlse, decode_layout(layout)[2], scale,
                                dq=dq, dk=dk, dv=dv)
    return dq, dk, dv


def _chunk_bwd_fake(q, k, v, out, lse, dout, dlse, layout, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _define(name, body, fake):
    if not _TRITON_OP:
        op = torch.library.custom_op(name, body, mutates_args=())
        op.register_fake(fake)
        return op
    # triton_op registers `body` itself as the fake implementation (it is make_fx traceable).
    return torch.library.triton_op(name, body, mutates_args=())


def _chunk_setup_context(ctx, inputs, output):
    q, k, v, layout, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.layout, ctx.scale = layout, scale


def _chunk_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.anyflow.triton_chunk_causal_attention_backward(
        q, k, v, out, lse, dout, dlse, ctx.layout, ctx.scale
    )
    return dq, dk, dv, None, None


_OPS: dict = {}


def _define_ops() -> None:
    """Define the torch.library ops once, on first use or at ``anyflow.enable`` (never inside a trace).

    Deferred so that ``import anyflow.ops`` does not import Triton (``triton_op`` needs it).
    """
    if _OPS:
        return
    _OPS["segmented_op"] = _define("anyflow::triton_segmented_attention", _segmented_body, _segmented_fake)
    _OPS["chunk_causal_op"] = _define("anyflow::triton_chunk_causal_attention", _chunk_body, _chunk_fake)
    _OPS["chunk_causal_backward_op"] = _define(
        "anyflow::triton_chunk_causal_attention_backward", _chunk_bwd_body, _chunk_bwd_fake
    )
    _OPS["chunk_causal_op"].register_autograd(_chunk_backward, setup_context=_chunk_setup_context)


registry.on_warm_up("triton", _define_ops)


def __getattr__(name):  # module attributes segmented_op, chunk_causal_op, chunk_causal_backward_op
    if name in ("segmented_op", "chunk_causal_op", "chunk_causal_backward_op"):
        _define_ops()
        return _OPS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
def _tensor_reason(tensors) -> Optional[str]:
    q = tensors[0]
    if q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        return f"batch x heads = {q.shape[0] * q.shape[1]} exceeds the {MAX_BATCH_HEADS} programs of grid axis 1"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the Triton attention kernels"
    device = q.device.type
    if not _INTERPRET and device != "cuda":
        return f"tensors are on {device}; the Triton kernels run on CUDA (or on CPU under TRITON_INTERPRET=1)"
    if _INTERPRET and device not in ("cpu", "cuda"):
        return f"tensors are on {device}; the Triton interpreter takes CPU or CUDA tensors"
    for t in tensors:
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            return "every q/k/v tensor needs a unit stride on the head dim (last axis)"
    return None


def _segmented_check(q, keys, values, scale, return_lse) -> Optional[str]:
    nonempty = sum(1 for k in keys if k.shape[2] > 0)
    if nonempty > MAX_SEGMENTS:
        return f"{nonempty} non-empty KV segments; the Triton kernel takes at most {MAX_SEGMENTS}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, *keys, *values)):
        return "the Triton segmented_attention is forward-only (inference); inputs require grad"
    return _tensor_reason((q, *keys, *values))


@registry.register("segmented_attention", "triton", check=_segmented_check)
def _segmented_attention_triton(q, keys, values, scale, return_lse):
    _define_ops()
    out, lse = _OPS["segmented_op"](q, list(keys), list(values), scale)
    return (out, lse) if return_lse else out


def _chunk_check(q, k, v, layout, scale, return_lse) -> Optional[str]:
    return _tensor_reason((q, k, v))


@registry.register("chunk_causal_attention", "triton", check=_chunk_check)
def _chunk_causal_attention_triton(q, k, v, layout, scale, return_lse):
    _define_ops()
    out, lse = _OPS["chunk_causal_op"](q, k, v, encode_layout(layout), scale)
    return (out, lse) if return_lse else out
