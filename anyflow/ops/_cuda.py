"""The ``"cuda"`` backend of the op registry: the compiled extension ``anyflow._C`` (``csrc/``).

Every op calls ``torch.ops.anyflow.c_<op>`` (schemas in ``csrc/bindings.cpp``): on CUDA tensors the
torch-free CUDA kernels of ``csrc/kernels``, on CPU tensors their C++ CPU twins (``csrc/cpu``), which
exist so that the extension - schemas, argument checks, argument packing - is tested without a GPU.
The implementations take exactly the arguments of the ``_<op>_torch`` references; segment tables and
attention layouts are flattened to int lists here.

The library is loaded only through :func:`anyflow._ext.extension_status`, lazily, on the first call:
importing this module loads nothing (the registry checks the extension before it calls an
implementation). Fake (meta) implementations are registered once the library is loaded, or at import
when it already is (torch imports this module for them: ``set_python_module`` in the bindings).

Each implementation has a ``check`` that returns why it cannot take a call (so ``backend="auto"``
moves on): inputs that require grad (the kernels are forward-only), dtype combinations, and the
kernels' limits (4 non-empty segments, head dim <= 256, 64 query groups / 4 key ranges per group,
batch * heads <= 65535, the row width of the row kernels on CUDA).
"""

from __future__ import annotations

import functools
import sys
from typing import Optional

import torch

from ..kernels.limits import MAX_BATCH_HEADS, MAX_GROUPS, MAX_HEAD_DIM, MAX_RANGES, MAX_ROW_CHUNKS, MAX_SEGMENTS
from . import registry
from .attention import AttentionLayout

_FAKES_REGISTERED = False


def _ready() -> bool:
    """Load ``anyflow._C`` (through ``anyflow._ext``) and register the fake implementations, once."""
    if not _FAKES_REGISTERED:
        from .. import _ext

        module, reason = _ext.extension_status()
        if module is None:
            raise registry.BackendUnavailableError(f"the cuda backend needs anyflow._C: {reason}")
        _register_fakes()
    return True


registry.on_warm_up("cuda", _ready)  # anyflow.enable loads the library before any torch.compile trace


def _ops():
    _ready()
    return torch.ops.anyflow


def _unit(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride (the kernels' only layout requirement)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _flat_segments(segs) -> list[int]:
    return [int(v) for pair in segs for v in pair]


def _flatten_layout(layout: AttentionLayout) -> tuple[list[int], int]:
    """``(q_start, q_end, n, k_start_1, k_end_1, ...)`` per group, as ``c_chunk_causal_attention`` takes
    it, and the largest number of non-empty key ranges of a group. Plain loops: torch.compile folds them."""
    flat, most = [], 0
    for qs, qe, ranges in layout.groups:
        flat += [int(qs), int(qe), len(ranges)]
        n = 0
        for ks, ke in ranges:
            flat += [int(ks), int(ke)]
            n += 1 if ke > ks else 0
        most = n if n > most else most
    return flat, most


_flatten_layout_cached = functools.lru_cache(maxsize=256)(_flatten_layout)


def _layout_info(layout: AttentionLayout) -> tuple[list[int], int]:
    if torch.compiler.is_compiling():  # a constant for the tracer; the cache only helps eager calls
        return _flatten_layout(layout)
    return _flatten_layout_cached(layout)


def _flat_layout(layout: AttentionLayout) -> list[int]:
    return _layout_info(layout)[0]


# ----------------------------------------------------------------------------------------------
# checks: why the cuda backend cannot take a call (None when it can)
# ----------------------------------------------------------------------------------------------
def _grad_reason(*tensors) -> Optional[str]:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return "the CUDA C++ kernels are forward-only (an input requires grad)"
    return None


def _segments_reason(segs) -> Optional[str]:
    non_empty = 0
    for f, _ in segs:
        non_empty += 1 if f > 0 else 0
    if non_empty > MAX_SEGMENTS:
        return f"at most {MAX_SEGMENTS} non-empty frame segments are supported, got {non_empty}"
    return None


def _row_limit(element_size: int, unit: int, fallback: int) -> int:
    """Widest row (channels) the CUDA row kernels take: ``MAX_ROW_CHUNKS`` chunks of 16 bytes' worth of
    elements when that vector width divides ``unit`` (the row, or the head dim), else of ``fallback``."""
    vec = 16 // element_size
    return MAX_ROW_CHUNKS * (vec if unit % vec == 0 else fallback)


def _row_reason(x: torch.Tensor, width: int, unit: Optional[int] = None, fallback: int = 1) -> Optional[str]:
    if x.device.type != "cuda":
        return None
    limit = _row_limit(x.element_size(), width if unit is None else unit, fallback)
    if width > limit:
        return f"rows of {width} channels are wider than one thread block handles ({limit} channels here)"
    return None


def _check_adaln(x, shift, scale, segs, eps):
    return _grad_reason(x, shift, scale) or _segments_reason(segs) or _row_reason(x, x.shape[-1])


def _check_gated(x, y, gate, segs):
    if y.dtype != x.dtype:
        return f"y must have x's dtype {x.dtype}, got {y.dtype}"
    return _grad_reason(x, y, gate) or _segments_reason(segs) or _row_reason(x, x.shape[-1])


def _check_residual_norm(x, y, gate, segs, eps, shift, scale, weight, bias):
    if y.dtype != x.dtype:
        return f"y must have x's dtype {x.dtype}, got {y.dtype}"
    return _grad_reason(x, y, gate, shift, scale, weight, bias) or _segments_reason(segs) or _row_reason(x, x.shape[-1])


def _check_qk_norm_rope(x, weight, eps, cos, sin, heads):
    head_dim = x.shape[-1] // heads if heads > 0 else x.shape[-1]
    return _grad_reason(x, weight) or _row_reason(x, x.shape[-1], head_dim, 2)


def _check_apply_rope(x, cos, sin):
    return _grad_reason(x)


def _check_euler(latents, velocity, dt, guidance_scale, num_context_frames, out):
    return _grad_reason(latents, velocity)


def _attention_shape_reason(q) -> Optional[str]:
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim must be <= {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        return f"batch * heads must be <= {MAX_BATCH_HEADS}, got {q.shape[0] * q.shape[1]}"
    return None


def _check_segmented(q, keys, values, scale, return_lse):
    non_empty = 0
    for k in keys:
        non_empty += 1 if k.shape[2] > 0 else 0
    if non_empty > MAX_SEGMENTS:
        return f"at most {MAX_SEGMENTS} non-empty KV segments are supported, got {non_empty}"
    return _grad_reason(q, *keys, *values) or _attention_shape_reason(q)


def _check_chunk_causal(q, k, v, layout, scale, return_lse):
    if len(layout.groups) > MAX_GROUPS:
        return f"at most {MAX_GROUPS} query groups are supported, the layout has {len(layout.groups)}"
    ranges = _layout_info(layout)[1]
    if ranges > MAX_RANGES:
        return f"at most {MAX_RANGES} key ranges per query group are supported, the layout has {ranges}"
    return _grad_reason(q, k, v) or _attention_shape_reason(q)


# ----------------------------------------------------------------------------------------------
# implementations (argument lists of the _<op>_torch references)
# ----------------------------------------------------------------------------------------------
@registry.register("adaln_modulate", "cuda", check=_check_adaln)
def _adaln_modulate_cuda(x, shift, scale, segs, eps):
    return _ops().c_adaln_modulate(_unit(x), _unit(shift), _unit(scale), _flat_segments(segs), eps)


@registry.register("gated_residual", "cuda", check=_check_gated)
def _gated_residual_cuda(x, y, gate, segs):
    return _ops().c_gated_residual(_unit(x), _unit(y), _unit(gate), _flat_segments(segs))


@registry.register("residual_norm", "cuda", check=_check_residual_norm)
def _residual_norm_cuda(x, y, gate, segs, eps, shift, scale, weight, bias):
    def opt(t, fix):
        return None if t is None else fix(t)

    return tuple(
        _ops().c_residual_norm(
            _unit(x), _unit(y), opt(gate, _unit), _flat_segments(segs), eps, opt(shift, _unit), opt(scale, _unit),
            opt(weight, torch.Tensor.contiguous), opt(bias, torch.Tensor.contiguous),
        )
    )


@registry.register("qk_norm_rope", "cuda", check=_check_qk_norm_rope)
def _qk_norm_rope_cuda(x, weight, eps, cos, sin, heads):
    return _ops().c_qk_norm_rope(_unit(x), weight.contiguous(), eps, cos.contiguous(), sin.contiguous(), heads)


@registry.register("apply_rope", "cuda", check=_check_apply_rope)
def _apply_rope_cuda(x, cos, sin):
    return _ops().c_apply_rope(_unit(x), cos.contiguous(), sin.contiguous())


@registry.register("euler_shortcut", "cuda", check=_check_euler)
def _euler_shortcut_cuda(latents, velocity, dt, guidance_scale, num_context_frames, out):
    ops = _ops()
    args = (latents.contiguous(), velocity.contiguous(), dt.contiguous(), guidance_scale, num_context_frames)
    if out is None:
        return ops.c_euler_shortcut(*args)
    if out.is_contiguous():  # in place, also when out is latents itself (elementwise: safe)
        ops.c_euler_shortcut_out(*args, out)
        return out
    out.copy_(ops.c_euler_shortcut(*args))
    return out


@registry.register("segmented_attention", "cuda", check=_check_segmented)
def _segmented_attention_cuda(q, keys, values, scale, return_lse):
    out, lse = _ops().c_segmented_attention(
        _unit(q), [_unit(k) for k in keys], [_unit(v) for v in values], scale, return_lse
    )
    return (out, lse) if return_lse else out


@registry.register("chunk_causal_attention", "cuda", check=_check_chunk_causal)
def _chunk_causal_attention_cuda(q, k, v, layout, scale, return_lse):
    out, lse = _ops().c_chunk_causal_attention(_unit(q), _unit(k), _unit(v), _flat_layout(layout), scale, return_lse)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# fake (meta) implementations: the output metadata of csrc/ops.cpp
# ----------------------------------------------------------------------------------------------
def _lse_fake(q, return_lse):
    shape = tuple(q.shape[:3]) if return_lse else (0,)
    return q.new_empty(shape, dtype=torch.float32)


def _register_fakes() -> None:
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return
    fake = torch.library.register_fake

    @fake("anyflow::c_adaln_modulate")
    def _(x, shift, scale, segments, eps):
        return x.new_empty(x.shape)

    @fake("anyflow::c_gated_residual")
    def _(x, y, gate, segments):
        return x.new_empty(x.shape)

    @fake("anyflow::c_residual_norm")
    def _(x, y, gate, segments, eps, shift, scale, weight, bias):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @fake("anyflow::c_qk_norm_rope")
    def _(x, weight, eps, cos, sin, heads):
        return x.new_empty((x.shape[0], x.shape[1], heads, x.shape[2] // heads))

    @fake("anyflow::c_apply_rope")
    def _(x, cos, sin):
        return x.new_empty(x.shape)

    @fake("anyflow::c_euler_shortcut")
    def _(latents, velocity, dt, guidance_scale, num_context_frames):
        return latents.new_empty(latents.shape)

    @fake("anyflow::c_euler_shortcut_out")
    def _(latents, velocity, dt, guidance_scale, num_context_frames, out):
        return None

    @fake("anyflow::c_segmented_attention")
    def _(q, keys, values, scale, return_lse, impl=0):
        return torch.empty_like(q), _lse_fake(q, return_lse)

    @fake("anyflow::c_chunk_causal_attention")
    def _(q, k, v, layout, scale, return_lse, impl=0):
        return torch.empty_like(q), _lse_fake(q, return_lse)

    _FAKES_REGISTERED = True


if "anyflow._C" in sys.modules:  # loaded before this module (torch importing it for a fake impl)
    _register_fakes()
