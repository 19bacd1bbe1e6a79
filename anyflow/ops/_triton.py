"""The ``"triton"`` backend: every Triton op's ``torch.library`` registration and registry entry, here only.

Naming: ``anyflow::triton_<op>`` for ``anyflow.ops.<op>`` (``_out``: the variant writing into ``out``;
``_backward``: a backward op); the CUDA backend's ops are ``anyflow::c_<op>`` (the extension's schemas,
``csrc/bindings.cpp``). The ops take the arguments of the op's torch reference with segment tables as
``int[]`` (:func:`anyflow.ops.conditioning.flat_segments`) and layouts as ``SymInt[]``
(:func:`encode_layout`); attention ops return ``(out, lse)``. All are differentiable except
``triton_euler_shortcut_out`` and ``triton_segmented_attention``: analytic PyTorch backward math from
:mod:`anyflow.kernels` (``<op>_setup`` / ``<op>_backward``), the chunk-causal attention through
``triton_chunk_causal_attention_backward`` (Triton kernels).

On a GPU the ops are ``torch.library.triton_op`` s (their bodies launch through ``wrap_triton``, so
Inductor traces into the kernels). Under the Triton CPU interpreter (``TRITON_INTERPRET=1``) that cannot
work (``wrap_triton`` hands back the raw interpreted kernel, which would run on the trace's fake
tensors), so there the same bodies are opaque ``torch.library.custom_op`` s with the fakes below.
The ops are defined on first use or by ``anyflow.enable`` (:func:`anyflow.ops.registry.warm_up`), never
at import: importing this module needs no Triton.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch

from ..kernels.limits import MAX_BATCH_HEADS, MAX_HEAD_DIM, MAX_ROPE_DIM, MAX_SEGMENTS
from . import registry
from .attention import flat_layout
from .conditioning import flat_segments

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# triton_op needs triton at definition time (it scans the body for kernels); without triton the ops
# can never run, so the opaque registration keeps `import anyflow.ops` quiet and triton-free.
_TRITON_OP = not _INTERPRET and registry.triton_installed()


# ----------------------------------------------------------------------------------------------
# attention bodies: layout decode, output allocation
# ----------------------------------------------------------------------------------------------
def encode_layout(layout) -> list[int]:
    """``[q_len, kv_len, G]`` followed by :func:`~anyflow.ops.attention.flat_layout` (``G`` groups)."""
    return [layout.q_len, layout.kv_len, len(layout.groups), *flat_layout(layout)]


def decode_layout(flat) -> tuple[int, int, tuple]:
    """Inverse of :func:`encode_layout`: ``(q_len, kv_len, groups)`` with hashable ``groups``.

    Under torch.compile with dynamic shapes the values arrive as SymInts (unhashable): ``int()``
    specializes them (the program tables need concrete values anyway) before the cached decode.
    """
    return _decode_layout(tuple(int(x) for x in flat))


@functools.lru_cache(maxsize=256)
def _decode_layout(flat: tuple) -> tuple[int, int, tuple]:
    groups, i = [], 3
    for _ in range(flat[2]):
        qs, qe, r = flat[i : i + 3]
        groups.append((qs, qe, tuple((flat[i + 3 + 2 * j], flat[i + 4 + 2 * j]) for j in range(r))))
        i += 3 + 2 * r
    return flat[0], flat[1], tuple(groups)


def _alloc_attention(q):
    # empty_like keeps q's memory layout (e.g. [B, L, H, D] viewed as [B, H, L, D]), so the output
    # can be viewed back without a copy; the kernels take strides.
    return torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


def _segmented_body(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from anyflow.kernels import attention

    out, lse = _alloc_attention(q)
    attention.segmented_attention_fwd(q, keys, values, scale, out=out, lse=lse)
    return out, lse


def _chunk_body(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: list[int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from anyflow.kernels import attention

    out, lse = _alloc_attention(q)
    attention.chunk_causal_fwd(q, k, v, decode_layout(layout)[2], scale, out=out, lse=lse)
    return out, lse


def _chunk_bwd_body(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dout: torch.Tensor, dlse: Optional[torch.Tensor], layout: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from anyflow.kernels import attention

    if dout.stride(-1) != 1:  # e.g. the expanded gradient of a sum(); the kernels need a unit D stride
        dout = dout.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    attention.chunk_causal_bwd(q, k, v, out, lse, dout, dlse, decode_layout(layout)[2], scale, dq=dq,
                               dk=dk, dv=dv)
    return dq, dk, dv


def _chunk_setup(ctx, inputs, output):
    q, k, v, layout, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.layout, ctx.scale = layout, scale


def _chunk_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.anyflow.triton_chunk_causal_attention_backward(
        q, k, v, out, lse, dout, dlse, ctx.layout, ctx.scale
    )
    return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------
# definitions
# ----------------------------------------------------------------------------------------------
def _like_first(x, *args):
    return x.new_empty(x.shape)


def _like_first2(x, *args):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _nothing(*args):
    return None


def _qk_fake(x, weight, eps, cos, sin, heads):
    return x.new_empty((x.shape[0], x.shape[1], heads, x.shape[2] // heads))


def _attention_fake(q, *args):
    return _alloc_attention(q)


def _chunk_bwd_fake(q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_OPS: dict = {}


def _define(op: str, body, fake, mutates=(), autograd=None):
    name = f"anyflow::triton_{op}"
    if _TRITON_OP:  # triton_op traces `body` itself as the fake implementation
        defined = torch.library.triton_op(name, body, mutates_args=mutates)
    else:
        defined = torch.library.custom_op(name, body, mutates_args=mutates)
        defined.register_fake(fake)
    if autograd is not None:
        defined.register_autograd(autograd[1], setup_context=autograd[0])
    _OPS[op] = defined


def define_ops() -> dict:
    """Define every ``anyflow::triton_*`` op once (first use, or :func:`anyflow.ops.registry.warm_up`
    outside any trace); returns ``{op: the torch.library op}`` (keys without the ``triton_`` prefix)."""
    if _OPS:
        return _OPS
    from anyflow.kernels import conditioning as C, euler as E, rope as R

    _define("adaln_modulate", C.adaln_modulate_fwd, _like_first, autograd=(C.adaln_modulate_setup,
                                                                           C.adaln_modulate_backward))
    _define("gated_residual", C.gated_residual_fwd, _like_first, autograd=(C.gated_residual_setup,
                                                                           C.gated_residual_backward))
    _define("residual_norm", C.residual_norm_fwd, _like_first2, autograd=(C.residual_norm_setup,
                                                                          C.residual_norm_backward))
    _define("apply_rope", R.apply_rope_fwd, _like_first, autograd=(R.apply_rope_setup, R.apply_rope_backward))
    _define("qk_norm_rope", R.qk_norm_rope_fwd, _qk_fake, autograd=(R.qk_norm_rope_setup, R.qk_norm_rope_backward))
    _define("euler_shortcut", E.euler_shortcut_fwd, _like_first, autograd=(E.euler_shortcut_setup,
                                                                           E.euler_shortcut_backward))
    _define("euler_shortcut_out", E.euler_shortcut_fwd_out, _nothing, mutates=("out",))
    _define("segmented_attention", _segmented_body, _attention_fake)
    _define("chunk_causal_attention_backward", _chunk_bwd_body, _chunk_bwd_fake)
    _define("chunk_causal_attention", _chunk_body, _attention_fake, autograd=(_chunk_setup, _chunk_backward))
    return _OPS


registry.on_warm_up("triton", define_ops)


# ----------------------------------------------------------------------------------------------
# registry: constraints and implementations (the arguments of the ops' torch references)
# ----------------------------------------------------------------------------------------------
def _unit_stride(q, k, v=None, *args):
    """Unit stride on the head dim of q, k, v."""
    tensors = (q, *k, *v) if isinstance(k, (list, tuple)) else (q, k, v)
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in tensors):
        return "every q/k/v tensor needs a unit stride on the head dim (last axis)"
    return None


#: Triton's supported NVIDIA hardware is compute capability 8.0+ (triton-lang/triton README); the
#: interpreter takes CPU (and CUDA) tensors.
_BASE = registry.Supports(devices=("cpu", "cuda") if _INTERPRET else ("cuda",), min_capability=(8, 0))
_SEGMENTED = dataclasses.replace(_BASE, max_segments=MAX_SEGMENTS)
_ROPE = dataclasses.replace(_BASE, max_head_dim=MAX_ROPE_DIM, even_head_dim=True)
_ATTENTION = dataclasses.replace(_BASE, max_head_dim=MAX_HEAD_DIM, max_batch_heads=MAX_BATCH_HEADS, check=_unit_stride)


@registry.register("adaln_modulate", "triton", _SEGMENTED)
def _adaln_modulate_triton(x, shift, scale, segs, eps):
    return define_ops()["adaln_modulate"](x, shift, scale, flat_segments(segs), float(eps))


@registry.register("gated_residual", "triton", _SEGMENTED)
def _gated_residual_triton(x, y, gate, segs):
    return define_ops()["gated_residual"](x, y, gate, flat_segments(segs))


@registry.register("residual_norm", "triton", _SEGMENTED)
def _residual_norm_triton(x, y, gate, segs, eps, shift, scale, weight, bias):
    return tuple(define_ops()["residual_norm"](x, y, gate, flat_segments(segs), float(eps), shift, scale, weight, bias))


@registry.register("apply_rope", "triton", _ROPE)
def _apply_rope_triton(x, cos, sin):
    return define_ops()["apply_rope"](x, cos, sin)


@registry.register("qk_norm_rope", "triton", _ROPE)
def _qk_norm_rope_triton(x, weight, eps, cos, sin, heads):
    return define_ops()["qk_norm_rope"](x, weight, float(eps), cos, sin, int(heads))


@registry.register("euler_shortcut", "triton", _BASE)
def _euler_shortcut_triton(latents, velocity, dt, guidance_scale, num_context_frames, out):
    """One pass into ``out`` (possibly ``latents`` itself) when it is contiguous and no gradient is needed;
    otherwise the functional op and ``out.copy_``."""
    ops = define_ops()
    args = (latents, velocity, dt, float(guidance_scale), int(num_context_frames))
    if out is None:
        return ops["euler_shortcut"](*args)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (latents, velocity, dt, out))
    if needs_grad or not out.is_contiguous() or not latents.is_contiguous():
        return out.copy_(ops["euler_shortcut"](*args))
    ops["euler_shortcut_out"](*args, out)
    return out


@registry.register("segmented_attention", "triton",
                   dataclasses.replace(_ATTENTION, autograd=False, max_segments=MAX_SEGMENTS))
def _segmented_attention_triton(q, keys, values, scale, return_lse):
    out, lse = define_ops()["segmented_attention"](q, list(keys), list(values), scale)
    return (out, lse) if return_lse else out


@registry.register("chunk_causal_attention", "triton", _ATTENTION)
def _chunk_causal_attention_triton(q, k, v, layout, scale, return_lse):
    out, lse = define_ops()["chunk_causal_attention"](q, k, v, encode_layout(layout), scale)
    return (out, lse) if return_lse else out
