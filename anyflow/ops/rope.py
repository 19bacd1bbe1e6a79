"""3-axis rotary position embedding of Wan / AnyFlow, with FAR's compressed-frame positions, in fp32.

Head dim D = 2P complex pairs split over (frame, row, col) as ``[P - 2*(D//6), D//6, D//6]`` pairs
(22/21/21 at D = 128). Axis a with ``n_a`` pairs rotates pair k by ``pos * theta^(-2k / (2 n_a))``.
Channel pair (2j, 2j+1) is the complex number ``x_2j + i x_2j+1`` (interleaved layout).

FAR compressed tokens (patch (1,4,4) instead of (1,2,2)) average-pool the row/col rotations over
``s = 2`` neighbouring positions and renormalise, which equals the rotation at the mid position
``s*h' + (s-1)/2`` (e.g. ``2h' + 0.5``) exactly. The official code and diffusers build the table in
complex128 and rotate q/k in float64 every layer; here the angles are computed once in float64, stored
as fp32 cos/sin and applied in fp32 (differences are at fp32 rounding level).

Source: diffusers ``AnyFlowRotaryPosEmbed`` / ``AnyFlowCausalRotaryPosEmbed``; the official code's
``apply_rotary_emb`` (``NVlabs/AnyFlow``, ``far/models/transformer_far_wan_model.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import registry
from ._checks import check_int, check_number, check_same_device, check_tensor


def rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (frame, row, col) for ``head_dim``.

    Raises:
        ValueError: odd ``head_dim`` or one too small to give every axis a pair.
    """
    head_dim = check_int("head_dim", head_dim)
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6 for 3-axis RoPE, got {head_dim}")
    hw = head_dim // 6
    return head_dim // 2 - 2 * hw, hw, hw


def rope_angles(
    head_dim: int,
    frames: torch.Tensor,
    height: int,
    width: int,
    downscale: int = 1,
    theta: float = 10000.0,
) -> torch.Tensor:
    """Rotation angles (float64) of a frame-major token grid.

    Args:
        head_dim: attention head dim D.
        frames: ``[F]`` absolute frame indices of the grid's frames.
        height, width: token grid per frame (latent H / patch, W / patch).
        downscale: 1 for full tokens, ``compressed_patch / patch`` (2) for FAR compressed tokens.

    Returns:
        ``[F * height * width, D / 2]`` float64 angles.
    """
    nt, nh, nw = rope_pair_split(head_dim)
    dev = frames.device

    def omega(n):
        return 1.0 / theta ** (torch.arange(0, 2 * n, 2, dtype=torch.float64, device=dev)[:n] / (2 * n))

    mid = (downscale - 1) / 2.0
    pos_h = torch.arange(height, dtype=torch.float64, device=dev) * downscale + mid
    pos_w = torch.arange(width, dtype=torch.float64, device=dev) * downscale + mid
    a_t = frames.to(torch.float64)[:, None] * omega(nt)[None, :]
    a_h = pos_h[:, None] * omega(nh)[None, :]
    a_w = pos_w[:, None] * omega(nw)[None, :]
    f, h, w = a_t.shape[0], height, width
    ang = torch.cat(
        [
            a_t[:, None, None, :].expand(f, h, w, nt),
            a_h[None, :, None, :].expand(f, h, w, nh),
            a_w[None, None, :, :].expand(f, h, w, nw),
        ],
        dim=-1,
    )
    return ang.reshape(f * h * w, nt + nh + nw)


def rope_table(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` tables ``[L, D/2]`` from float64 angles."""
    return torch.cos(angles).float(), torch.sin(angles).float()


registry.describe("apply_rope", lambda x, cos, sin: registry.call_of(x, (x, cos, sin), head_dim=x.shape[-1]))
registry.describe("qk_norm_rope", lambda x, weight, eps, cos, sin, heads: registry.call_of(
    x, (x, weight), head_dim=x.shape[-1] // heads))


@registry.register("apply_rope", "torch")
def _apply_rope_torch(x, cos, sin):
    xf = x.float().unflatten(-1, (-1, 2))
    xr, xi = xf[..., 0], xf[..., 1]
    c = cos[:, None, :]
    s = sin[:, None, :]
    out = torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: Optional[str] = None):
    """Rotate interleaved channel pairs of ``x`` by per-token angles, in fp32.

    Args:
        x: ``[B, L, H, D]`` queries or keys (any float dtype; strided views are fine).
        cos, sin: ``[L, D/2]`` fp32 tables from :func:`rope_table`.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default).

    Returns:
        ``[B, L, H, D]`` in ``x.dtype``.

    Raises:
        ValueError / TypeError: table shapes that do not match ``x``.
    """
    check_tensor("x", x, ndim=4)
    if x.shape[3] % 2:
        raise ValueError(f"x must be [B, L, H, D] with an even head dim D (interleaved pairs), got shape {tuple(x.shape)}")
    check_tensor("cos", cos, ndim=2, dtypes=(torch.float32,))
    check_tensor("sin", sin, ndim=2, dtypes=(torch.float32,))
    if cos.shape != (x.shape[1], x.shape[3] // 2) or sin.shape != cos.shape:
        raise ValueError(
            f"cos/sin must be [L, D/2] = [{x.shape[1]}, {x.shape[3] // 2}] for x {tuple(x.shape)}, got "
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    check_same_device(x=x, cos=cos, sin=sin)
    return registry.dispatch("apply_rope", backend, x.device.type, x, cos, sin)


@registry.register("qk_norm_rope", "torch")
def _qk_norm_rope_torch(x, weight, eps, cos, sin, heads):
    xf = x.float()
    h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return _apply_rope_torch(h.unflatten(-1, (heads, -1)), cos, sin).to(x.dtype)


def qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float = 1e-6,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """RMSNorm across all heads (Wan's ``rms_norm_across_heads``) followed by 3-axis RoPE, in fp32.

    Args:
        x: ``[B, L, H*Dh]`` projected queries or keys (``to_q`` / ``to_k`` output).
        weight: ``[H*Dh]`` RMSNorm weight (``norm_q`` / ``norm_k``).
        cos, sin: ``[L, Dh/2]`` fp32 RoPE tables (:func:`rope_table`).
        heads: number of heads H.
        eps: RMSNorm epsilon.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default).

    Returns:
        ``[B, L, H, Dh]`` in ``x.dtype``, rotated (the layout the KV cache stores after a transpose).

    Raises:
        ValueError / TypeError: shapes, dtypes or devices that do not fit.

    Source: diffusers ``RMSNorm`` + ``apply_rotary_emb`` in ``AnyFlowCausalAttnProcessor`` (which
    rotates in complex128; here fp32, one rounding at the end).
    """
    check_tensor("x", x, ndim=3)
    check_tensor("weight", weight, ndim=1)
    heads = check_int("heads", heads, minimum=1)
    if x.shape[2] % heads or weight.shape[0] != x.shape[2]:
        raise ValueError(f"x [B, L, H*Dh] = {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit heads={heads}")
    dh = x.shape[2] // heads
    if dh % 2:
        raise ValueError(f"x must be [B, L, H*Dh] with an even head dim Dh (interleaved pairs), got Dh={dh} "
                         f"(shape {tuple(x.shape)}, heads={heads})")
    check_tensor("cos", cos, ndim=2, dtypes=(torch.float32,))
    check_tensor("sin", sin, ndim=2, dtypes=(torch.float32,))
    if cos.shape != (x.shape[1], dh // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [L, Dh/2] = [{x.shape[1]}, {dh // 2}] for x {tuple(x.shape)}, got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    check_same_device(x=x, weight=weight, cos=cos, sin=sin)
    eps = check_number("eps", eps, minimum=0.0)
    return registry.dispatch("qk_norm_rope", backend, x.device.type, x, weight, eps, cos, sin, heads)
