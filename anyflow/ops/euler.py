"""The flow-map Euler shortcut update ``z_r = z_t - (t - r)/1000 * u``, with optional CFG combine.

Source: AnyFlow §3 (flow map sampling); diffusers ``FlowMapEulerDiscreteScheduler.step`` and the CFG
combine of ``AnyFlowPipeline.__call__``. Unlike diffusers, which rounds the latent to the model dtype
after every step, the latent here is an fp32 master copy; the CFG combine is also done in fp32.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import registry
from ._checks import check_int, check_number, check_same_device, check_tensor

TimeArg = Union[float, torch.Tensor]


def _per_frame_time(x: TimeArg, b: int, f: int, device, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold real timesteps, got dtype {x.dtype}")
        if x.numel() == 1:
            return x.reshape(1, 1).to(device=device, dtype=torch.float64).expand(b, f)
        if x.shape != (b, f):
            raise ValueError(f"{name} must be a number or a [B, F] = [{b}, {f}] tensor, got shape {tuple(x.shape)}")
        return x.to(device=device, dtype=torch.float64)
    return torch.full((b, f), check_number(name, x, 0.0, 1000.0), dtype=torch.float64, device=device)


registry.describe("euler_shortcut", lambda latents, velocity, dt, *args: registry.call_of(
    latents, (latents, velocity, dt)))


@registry.register("euler_shortcut", "torch")
def _euler_shortcut_torch(latents, velocity, dt, guidance_scale, num_context_frames, out):
    b = latents.shape[0]
    u = velocity.float()
    if velocity.shape[0] == 2 * b:
        u_uncond, u_cond = u[:b], u[b:]
        u = u_uncond + guidance_scale * (u_cond - u_uncond)
    z = latents.float() - dt[:, :, None, None, None] * u
    if num_context_frames:
        z[:, :num_context_frames] = latents[:, :num_context_frames]
    if out is None:
        return z.to(latents.dtype)
    out.copy_(z)
    return out


def euler_shortcut(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    t: TimeArg,
    r: TimeArg,
    *,
    guidance_scale: float = 1.0,
    num_context_frames: int = 0,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One flow-map jump from noise level t to r: ``z_r = z_t - (t - r) / 1000 * u``.

    Args:
        latents: ``[B, F, C, H, W]`` current latent z_t (fp32 master copy recommended).
        velocity: ``[B, F, C, H, W]`` mean velocity u from the model, or ``[2B, F, C, H, W]`` stacked
            ``[uncond; cond]`` for classifier-free guidance (any float dtype, e.g. bf16).
        t, r: timesteps in [0, 1000]: numbers (checked) or per-frame ``[B, F]`` tensors (not range-checked: that
            would synchronise with the device). ``r > t`` is allowed (a backward jump).
        guidance_scale: CFG scale g; used when ``velocity`` has batch 2B:
            ``u = u_uncond + g * (u_cond - u_uncond)`` in fp32.
        num_context_frames: leading frames (I2V / V2V context) copied through unchanged.
        out: optional ``[B, F, C, H, W]`` destination (may be ``latents`` itself).
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"`` (default).

    Returns:
        ``[B, F, C, H, W]`` z_r in ``latents.dtype`` (or ``out``).

    Raises:
        ValueError / TypeError: shapes, dtypes or devices that do not fit; ``num_context_frames``
            outside ``[0, F]``; a number ``t`` or ``r`` outside ``[0, 1000]``.
    """
    check_tensor("latents", latents, ndim=5)
    check_tensor("velocity", velocity, ndim=5)
    b, f = latents.shape[:2]
    if velocity.shape[1:] != latents.shape[1:] or velocity.shape[0] not in (b, 2 * b):
        raise ValueError(
            f"velocity must be [B or 2B, F, C, H, W] with latents {tuple(latents.shape)}, got {tuple(velocity.shape)}"
        )
    num_context_frames = check_int("num_context_frames", num_context_frames)
    if not 0 <= num_context_frames <= f:
        raise ValueError(f"num_context_frames must be in [0, {f}], got {num_context_frames}")
    guidance_scale = check_number("guidance_scale", guidance_scale)
    if out is not None:
        check_tensor("out", out, ndim=5)
        if out.shape != latents.shape or out.dtype != latents.dtype:
            raise ValueError(f"out must match latents {tuple(latents.shape)} {latents.dtype}, got {tuple(out.shape)} "
                             f"{out.dtype}")
    check_same_device(latents=latents, velocity=velocity, out=out)
    dt = (_per_frame_time(t, b, f, latents.device, "t") - _per_frame_time(r, b, f, latents.device, "r")) / 1000.0
    return registry.dispatch(
        "euler_shortcut", backend, latents.device.type, latents, velocity, dt.float(), guidance_scale,
        num_context_frames, out,
    )
