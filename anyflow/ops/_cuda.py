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

Each implementation declares what it supports (:class:`anyflow.ops.registry.Supports`): forward only,
the limits of :mod:`anyflow.kernels.limits` (4 non-empty segments, head dim <= 256, batch * heads <=
65535), plus small checks for what data cannot say (64 query groups / 4 key ranges per group of a
layout, the row width of the row kernels on CUDA, ``y`` in ``x``'s dtype).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import torch

from ..kernels.limits import MAX_BATCH_HEADS, MAX_GROUPS, MAX_HEAD_DIM, MAX_RANGES, MAX_ROW_CHUNKS, MAX_SEGMENTS
from . import registry
from .attention import flat_layout
from .conditioning import flat_segments

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


# ----------------------------------------------------------------------------------------------
# constraints (limits: anyflow/kernels/limits.py, the ones csrc/kernels is built to)
# ----------------------------------------------------------------------------------------------
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


def _check_row(x, *args):
    """Rows fit one thread block (on CUDA)."""
    return _row_reason(x, x.shape[-1])


def _check_residual(x, y, *args):
    """y has x's dtype; rows fit one thread block (on CUDA)."""
    if y.dtype != x.dtype:
        return f"y must have x's dtype {x.dtype}, got {y.dtype}"
    return _row_reason(x, x.shape[-1])


def _check_qk_row(x, weight, eps, cos, sin, heads):
    """Rows fit one thread block (on CUDA)."""
    return _row_reason(x, x.shape[-1], x.shape[-1] // heads, 2)


def _check_layout(q, k, v, layout, scale, return_lse):
    """At most 64 query groups and 4 key ranges per group."""
    if len(layout.groups) > MAX_GROUPS:
        return f"at most {MAX_GROUPS} query groups are supported, the layout has {len(layout.groups)}"
    ranges = max(len(r) for _, _, r in layout.groups)
    if ranges > MAX_RANGES:
        return f"at most {MAX_RANGES} key ranges per query group are supported, the layout has {ranges}"
    return None


_FORWARD = registry.Supports(autograd=False)  # CUDA tensors, or CPU tensors on the C++ CPU twins
_SEGMENTED = dataclasses.replace(_FORWARD, max_segments=MAX_SEGMENTS)
_ATTENTION = dataclasses.replace(_FORWARD, max_head_dim=MAX_HEAD_DIM, max_batch_heads=MAX_BATCH_HEADS)


# ----------------------------------------------------------------------------------------------
# implementations (argument lists of the _<op>_torch references)
# ----------------------------------------------------------------------------------------------
@registry.register("adaln_modulate", "cuda", dataclasses.replace(_SEGMENTED, check=_check_row))
def _adaln_modulate_cuda(x, shift, scale, segs, eps):
    return _ops().c_adaln_modulate(_unit(x), _unit(shift), _unit(scale), flat_segments(segs), eps)


@registry.register("gated_residual", "cuda", dataclasses.replace(_SEGMENTED, check=_check_residual))
def _gated_residual_cuda(x, y, gate, segs):
    return _ops().c_gated_residual(_unit(x), _unit(y), _unit(gate), flat_segments(segs))


@registry.register("residual_norm", "cuda", dataclasses.replace(_SEGMENTED, check=_check_residual))
def _residual_norm_cuda(x, y, gate, segs, eps, shift, scale, weight, bias):
    def opt(t, fix):
        return None if t is None else fix(t)

    return tuple(
        _ops().c_residual_norm(
            _unit(x), _unit(y), opt(gate, _unit), flat_segments(segs), eps, opt(shift, _unit), opt(scale, _unit),
            opt(weight, torch.Tensor.contiguous), opt(bias, torch.Tensor.contiguous),
        )
    )


@registry.register("qk_norm_rope", "cuda", dataclasses.replace(_FORWARD, check=_check_qk_row))
def _qk_norm_rope_cuda(x, weight, eps, cos, sin, heads):
    return _ops().c_qk_norm_rope(_unit(x), weight.contiguous(), eps, cos.contiguous(), sin.contiguous(), heads)


@registry.register("apply_rope", "cuda", _FORWARD)
def _apply_rope_cuda(x, cos, sin):
    return _ops().c_apply_rope(_unit(x), cos.contiguous(), sin.contiguous())


@registry.register("euler_shortcut", "cuda", _FORWARD)
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


@registry.register("segmented_attention", "cuda", dataclasses.replace(_ATTENTION, max_segments=MAX_SEGMENTS))
def _segmented_attention_cuda(q, keys, values, scale, return_lse):
    out, lse = _ops().c_segmented_attention(
        _unit(q), [_unit(k) for k in keys], [_unit(v) for v in values], scale, return_lse
    )
    return (out, lse) if return_lse else out


@registry.register("chunk_causal_attention", "cuda", dataclasses.replace(_ATTENTION, check=_check_layout))
def _chunk_causal_attention_cuda(q, k, v, layout, scale, return_lse):
    out, lse = _ops().c_chunk_causal_attention(_unit(q), _unit(k), _unit(v), flat_layout(layout), scale, return_lse)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# fake (meta) implementations: the output metadata of csrc/ops.cpp
# ----------------------------------------------------------------------------------------------
def _like(x, *args):
    return x.new_empty(x.shape)


def _attention(q, return_lse):
    return torch.empty_like(q), q.new_empty(tuple(q.shape[:3]) if return_lse else (0,), dtype=torch.float32)


_FAKES = {
    "c_adaln_modulate": _like, "c_gated_residual": _like, "c_apply_rope": _like, "c_euler_shortcut": _like,
    "c_residual_norm": lambda x, *args: (_like(x), _like(x)),
    "c_qk_norm_rope": lambda x, weight, eps, cos, sin, heads: x.new_empty((*x.shape[:2], heads, x.shape[2] // heads)),
    "c_euler_shortcut_out": lambda *args: None,
    "c_segmented_attention": lambda q, keys, values, scale, return_lse, impl=0: _attention(q, return_lse),
    "c_chunk_causal_attention": lambda q, k, v, layout, scale, return_lse, impl=0: _attention(q, return_lse),
}


def _register_fakes() -> None:
    global _FAKES_REGISTERED
    if not _FAKES_REGISTERED:
        for name, fake in _FAKES.items():
            torch.library.register_fake(f"anyflow::{name}", fake)
        _FAKES_REGISTERED = True


if "anyflow._C" in sys.modules:  # loaded before this module (torch importing it for a fake impl)
    _register_fakes()
