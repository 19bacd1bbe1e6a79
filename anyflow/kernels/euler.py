"""Triton kernel for the flow-map Euler shortcut ``z_r = z_t - dt[b, f] * u`` with the CFG combine.

``latents [B, F, C, H, W]`` is viewed as ``[B*F, S]`` (S = C*H*W); the grid is ``(cdiv(S, BLOCK), B*F)``
so each program handles one frame of one sample and reads ``dt[b, f]`` once. With a ``[2B, ...]``
velocity (``[uncond; cond]``), ``u = uu + g * (uc - uu)`` in fp32. Frames ``f < num_context_frames``
are copied through unchanged (the velocity is not read there). One read of each input, one write;
writing in place (``out`` is ``latents``) is safe because every element is loaded before it is stored
by the same program.

Entry points: the launchers ``euler_shortcut_fwd`` (functional) and ``euler_shortcut_fwd_out`` (writes
``out``), bodies of ``anyflow::triton_euler_shortcut`` / ``anyflow::triton_euler_shortcut_out``
(registered by :mod:`anyflow.ops._triton`), and the functional op's analytic PyTorch backward in fp32
(``euler_shortcut_setup`` / ``euler_shortcut_backward``); the ``_out`` op has no autograd (callers that
need gradients use the functional op and copy).
"""

import torch
import triton
import triton.language as tl

from . import conditioning as _c
from .conditioning import cast_to, launcher

#: Elements per program (one frame is 16*60*104 = 99,840 elements for Wan 480p latents).
BLOCK = 16384 if _c.INTERPRET else 2048


@triton.jit
def _euler_kernel(
    z_ptr, v_ptr, dt_ptr, o_ptr, S, BF, g, NCTX, F,
    CFG: tl.constexpr, BLOCK: tl.constexpr,
):
    bf = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    base = bf.to(tl.int64) * S
    z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if bf % F >= NCTX:
        u = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if CFG:
            uc = tl.load(v_ptr + (bf + BF).to(tl.int64) * S + offs, mask=mask, other=0.0).to(tl.float32)
            u = u + g * (uc - u)
        z = z - tl.load(dt_ptr + bf) * u
    tl.store(o_ptr + base + offs, cast_to(z, o_ptr.dtype.element_ty), mask=mask)


def _launch(latents, velocity, dt, guidance_scale, num_context_frames, out):
    b, f = latents.shape[:2]
    s = latents[0, 0].numel() if b * f else 0
    if b * f == 0 or s == 0:
        return
    block = min(BLOCK, _c.next_pow2(s))
    grid = (triton.cdiv(s, block), b * f)
    launcher(_euler_kernel)[grid](
        latents, velocity, dt, out, s, b * f, guidance_scale, num_context_frames, f,
        CFG=velocity.shape[0] == 2 * b, BLOCK=block, num_warps=4,
    )


def euler_shortcut_fwd(latents: torch.Tensor, velocity: torch.Tensor, dt: torch.Tensor, guidance_scale: float,
                       num_context_frames: int) -> torch.Tensor:
    out = _c.alloc_output(latents.shape, latents.dtype, latents.device)
    _launch(latents.contiguous(), velocity.contiguous(), dt.contiguous(), guidance_scale, num_context_frames, out)
    return out


def euler_shortcut_fwd_out(latents: torch.Tensor, velocity: torch.Tensor, dt: torch.Tensor, guidance_scale: float,
                           num_context_frames: int, out: torch.Tensor) -> None:
    # ``out`` must be contiguous (the entry point routes other layouts through the functional op)
    _launch(latents.contiguous(), velocity.contiguous(), dt.contiguous(), guidance_scale, num_context_frames, out)


# ----------------------------------------------------------------------------------------------
# autograd of the functional op: analytic backward in PyTorch (fp32)
# ----------------------------------------------------------------------------------------------
def euler_shortcut_setup(ctx, inputs, output):
    latents, velocity, dt, guidance_scale, num_context_frames = inputs
    ctx.save_for_backward(velocity, dt)
    ctx.g, ctx.nctx, ctx.lat_dtype = guidance_scale, num_context_frames, latents.dtype


def euler_shortcut_backward(ctx, grad):
    velocity, dt = ctx.saved_tensors
    need = ctx.needs_input_grad
    b = grad.shape[0]
    gz = grad.float()
    d_lat = grad.to(ctx.lat_dtype) if need[0] else None
    live = torch.ones(grad.shape[1], device=grad.device, dtype=torch.float32)
    live[: ctx.nctx] = 0  # context frames are copied: no path to velocity or dt
    d_vel = d_dt = None
    if need[1]:
        gu = -(dt.float() * live)[:, :, None, None, None] * gz
        if velocity.shape[0] == 2 * b:
            gu = torch.cat([(1 - ctx.g) * gu, ctx.g * gu])
        d_vel = gu.to(velocity.dtype)
    if need[2]:
        u = velocity.float()
        if velocity.shape[0] == 2 * b:
            u = u[:b] + ctx.g * (u[b:] - u[:b])
        d_dt = (-(gz * u).sum((2, 3, 4)) * live).to(dt.dtype)
    return d_lat, d_vel, d_dt, None, None
