"""Triton backend of the elementwise / normalisation ops (kernels in ``anyflow.kernels``).

Registers ``"triton"`` implementations of ``adaln_modulate``, ``gated_residual``, ``residual_norm``,
``apply_rope``, ``qk_norm_rope`` and ``euler_shortcut``. Each receives exactly the (validated)
arguments of the op's torch reference and returns the same thing. Importing this module needs no
Triton: the kernels are imported on the first call. Each ``check`` returns why a call cannot run
(no CUDA tensors outside the interpreter, too many segments, odd head dim).
"""

from __future__ import annotations

import os
from typing import Optional

from ..kernels.limits import MAX_ROPE_DIM, MAX_SEGMENTS
from . import registry


def _device_reason(t) -> Optional[str]:
    if t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the Triton kernels need CUDA tensors, got {t.device.type} (or set TRITON_INTERPRET=1)"


def _segments_reason(segs) -> Optional[str]:
    used = [s for s in segs if s[0] > 0]
    if len(used) > MAX_SEGMENTS:
        return f"at most {MAX_SEGMENTS} non-empty frame segments are supported, got {len(used)}"
    return None


def _check_adaln(x, shift, scale, segs, eps):
    return _device_reason(x) or _segments_reason(segs)


def _check_gated(x, y, gate, segs):
    return _device_reason(x) or _segments_reason(segs)


def _check_residual_norm(x, y, gate, segs, eps, shift, scale, weight, bias):
    return _device_reason(x) or _segments_reason(segs)


def _check_rope_dim(dim: int) -> Optional[str]:
    if dim % 2:
        return f"the head dim must be even for interleaved RoPE, got {dim}"
    if dim > MAX_ROPE_DIM:
        return f"head dims above {MAX_ROPE_DIM} are not supported, got {dim}"
    return None


def _check_apply_rope(x, cos, sin):
    return _device_reason(x) or _check_rope_dim(x.shape[-1])


def _check_qk_norm_rope(x, weight, eps, cos, sin, heads):
    return _device_reason(x) or _check_rope_dim(x.shape[-1] // heads)


def _check_euler(latents, velocity, dt, guidance_scale, num_context_frames, out):
    return _device_reason(latents)


@registry.register("adaln_modulate", "triton", check=_check_adaln)
def _adaln_modulate_triton(x, shift, scale, segs, eps):
    from anyflow.kernels import conditioning

    return conditioning.adaln_modulate(x, shift, scale, segs, eps)


@registry.register("gated_residual", "triton", check=_check_gated)
def _gated_residual_triton(x, y, gate, segs):
    from anyflow.kernels import conditioning

    return conditioning.gated_residual(x, y, gate, segs)


@registry.register("residual_norm", "triton", check=_check_residual_norm)
def _residual_norm_triton(x, y, gate, segs, eps, shift, scale, weight, bias):
    from anyflow.kernels import conditioning

    return conditioning.residual_norm(x, y, gate, segs, eps, shift, scale, weight, bias)


@registry.register("apply_rope", "triton", check=_check_apply_rope)
def _apply_rope_triton(x, cos, sin):
    from anyflow.kernels import rope

    return rope.apply_rope(x, cos, sin)


@registry.register("qk_norm_rope", "triton", check=_check_qk_norm_rope)
def _qk_norm_rope_triton(x, weight, eps, cos, sin, heads):
    from anyflow.kernels import rope

    return rope.qk_norm_rope(x, weight, eps, cos, sin, heads)


@registry.register("euler_shortcut", "triton", check=_check_euler)
def _euler_shortcut_triton(latents, velocity, dt, guidance_scale, num_context_frames, out):
    from anyflow.kernels import euler

    return euler.euler_shortcut(latents, velocity, dt, guidance_scale, num_context_frames, out)
