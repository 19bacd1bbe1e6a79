"""Triton kernels for interleaved 3-axis RoPE and the fused across-heads QK RMSNorm + RoPE.

* ``apply_rope``: ``x [B, L, H, D]`` (any strides) rotated pair-wise, ``(x_2j + i x_2j+1) * e^{i theta}``,
  with fp32 ``cos`` / ``sin`` tables ``[L, D/2]``. Rows are ``(b, l, h)``; a program owns ``BLOCK_M``
  rows and loads them as ``[BLOCK_M, BLOCK_P, 2]`` tiles (pairs contiguous, so loads stay vectorised),
  splits real / imaginary with ``tl.split`` and re-interleaves with ``tl.join``. Output contiguous.
* ``qk_norm_rope``: ``x [B, L, H*Dh]`` (last dim contiguous; other strides free, e.g. a slice of a
  fused QKV projection) -> RMSNorm over all ``H*Dh`` channels (fp32 mean of squares, ``eps``) times
  ``weight``, then the rotation of each head's pairs; output ``[B, L, H, Dh]`` contiguous in
  ``x.dtype``. A program owns ``BLOCK_M`` tokens and all channels when ``H*Dh`` fits one block
  (``<=`` :data:`anyflow.kernels.conditioning.MAX_BLOCK_D`); wider rows take two passes over chunks
  (sum of squares, then normalise / rotate / store).

One read and one write per element, math in fp32, one rounding at the store. Entry points: the
launchers ``apply_rope_fwd`` / ``qk_norm_rope_fwd`` (bodies of ``anyflow::triton_apply_rope`` /
``anyflow::triton_qk_norm_rope``, registered by :mod:`anyflow.ops._triton`) and their analytic PyTorch
backward in fp32 (the rotation by ``-theta``; the RMSNorm backward), not a Triton kernel.
"""

import torch
import triton
import triton.language as tl

from . import conditioning as _c
from .conditioning import autotune_configs, cast_to, launcher


@triton.autotune(configs=autotune_configs((2, 4, 8)), key=["P", "BLOCK_M", "BLOCK_P"])
@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, o_ptr,
    M, L, H, P, sxb, sxl, sxh, sxd,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows = rows.to(tl.int64)
    h = rows % H
    l = (rows // H) % L
    b = rows // (H * L)
    p = tl.arange(0, BLOCK_P)
    c = tl.arange(0, 2)
    pmask = rmask[:, None] & (p < P)[None, :]
    mask = pmask[:, :, None]  # broadcast over the (re, im) axis by load / store
    chan = 2 * p[None, :, None] + c[None, None, :]
    x = tl.load(x_ptr + (b * sxb + l * sxl + h * sxh)[:, None, None] + chan * sxd, mask=mask, other=0.0)
    xr, xi = tl.split(x.to(tl.float32))
    tab = l[:, None] * P + p[None, :]
    cs = tl.load(cos_ptr + tab, mask=pmask, other=0.0)
    sn = tl.load(sin_ptr + tab, mask=pmask, other=0.0)
    out = tl.join(xr * cs - xi * sn, xr * sn + xi * cs)
    tl.store(o_ptr + (rows * (2 * P))[:, None, None] + chan, cast_to(out, o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pair_channels(q):
    # [1, BLOCK_Q, 2] channel of each (pair, re/im). Computed apart from the load: torch's TTIR mutation
    # analysis marks every argument of a helper whose result feeds a store pointer as written, so
    # returning it from _load_pairs made torch.compile treat x as mutated (and clone it every call).
    return 2 * q[None, :, None] + tl.arange(0, 2)[None, None, :]


@triton.jit
def _load_pairs(x_ptr, b, l, q, sxb, sxl, pmask):
    chan = _pair_channels(q)
    x = tl.load(x_ptr + (b * sxb + l * sxl)[:, None, None] + chan, mask=pmask[:, :, None], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _norm_rotate_store(
    x, chan, rstd, w_ptr, cos_ptr, sin_ptr, o_ptr, rows, l, q, qmask, pmask, C, P,
):
    w = tl.load(w_ptr + chan, mask=qmask[None, :, None], other=0.0).to(tl.float32)
    hr, hi = tl.split(x * rstd[:, None, None] * w)
    tab = l[:, None] * P + (q % P)[None, :]
    cs = tl.load(cos_ptr + tab, mask=pmask, other=0.0)
    sn = tl.load(sin_ptr + tab, mask=pmask, other=0.0)
    out = tl.join(hr * cs - hi * sn, hr * sn + hi * cs)
    tl.store(o_ptr + (rows * C)[:, None, None] + chan, cast_to(out, o_ptr.dtype.element_ty), mask=pmask[:, :, None])


@triton.autotune(configs=autotune_configs(), key=["C", "P", "BLOCK_M", "BLOCK_Q"])
@triton.jit
def _qk_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, o_ptr,
    M, L, C, P, eps, sxb, sxl,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, CHUNKED: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows = rows.to(tl.int64)
    l = rows % L
    b = rows // L
    Q = C // 2
    if not CHUNKED:
        q = tl.arange(0, BLOCK_Q)
        qmask = q < Q
        pmask = rmask[:, None] & qmask[None, :]
        x = _load_pairs(x_ptr, b, l, q, sxb, sxl, pmask)
        chan = _pair_channels(q)
        rstd = tl.math.rsqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / C + eps)
        _norm_rotate_store(x, chan, rstd, w_ptr, cos_ptr, sin_ptr, o_ptr, rows, l, q, qmask, pmask, C, P)
    else:
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for q0 in range(0, Q, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            x = _load_pairs(x_ptr, b, l, q, sxb, sxl, rmask[:, None] & (q < Q)[None, :])
            ss += tl.sum(tl.sum(x * x, axis=2), axis=1)
        rstd = tl.math.rsqrt(ss / C + eps)
        for q0 in range(0, Q, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            qmask = q < Q
            pmask = rmask[:, None] & qmask[None, :]
            x = _load_pairs(x_ptr, b, l, q, sxb, sxl, pmask)
            chan = _pair_channels(q)
            _norm_rotate_store(x, chan, rstd, w_ptr, cos_ptr, sin_ptr, o_ptr, rows, l, q, qmask, pmask, C, P)


# ----------------------------------------------------------------------------------------------
# forward launchers
# ----------------------------------------------------------------------------------------------
def apply_rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    bsz, seq, heads, dim = x.shape
    out = _c.alloc_output((bsz, seq, heads, dim), x.dtype, x.device)
    m = bsz * seq * heads
    if m == 0 or dim == 0:
        return out
    cos, sin = cos.contiguous(), sin.contiguous()
    p = dim // 2
    block_p = _c.next_pow2(p)
    block_m = _c.row_block(2 * block_p, m)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    launcher(_rope_kernel)[grid](
        x, cos, sin, out, m, seq, heads, p, *x.stride(), BLOCK_M=block_m, BLOCK_P=block_p,
    )
    return out


def qk_norm_rope_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                     heads: int) -> torch.Tensor:
    bsz, seq, c = x.shape
    out = _c.alloc_output((bsz, seq, heads, c // heads), x.dtype, x.device)
    m = bsz * seq
    if m == 0 or c == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight, cos, sin = weight.contiguous(), cos.contiguous(), sin.contiguous()
    block_q = _c.next_pow2(c // 2)
    chunked = 2 * block_q > _c.MAX_BLOCK_D
    if chunked:
        block_q = max(1, _c.next_pow2(_c.MAX_BLOCK_D) // 2)
    block_m = _c.row_block(2 * block_q, m)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    launcher(_qk_norm_rope_kernel)[grid](
        x, weight, cos, sin, out, m, seq, c, c // heads // 2, eps, x.stride(0), x.stride(1),
        BLOCK_M=block_m, BLOCK_Q=block_q, CHUNKED=chunked,
    )
    return out


# ----------------------------------------------------------------------------------------------
# autograd: analytic backward in PyTorch (fp32)
# ----------------------------------------------------------------------------------------------
def _rotate_back(g, cos, sin):
    """Gradient of the rotation w.r.t. its input: rotate ``g [B, L, H, D]`` by ``-theta`` (fp32)."""
    gf = g.float().unflatten(-1, (-1, 2))
    gr, gi = gf[..., 0], gf[..., 1]
    c, s = cos[:, None, :].float(), sin[:, None, :].float()
    return torch.stack([gr * c + gi * s, gi * c - gr * s], dim=-1).flatten(-2)


def _table_grads(g, h, need_cos, need_sin):
    """Grads of the fp32 tables from ``g`` and the rotated input ``h`` (both ``[B, L, H, D]``)."""
    gf = g.float().unflatten(-1, (-1, 2))
    hf = h.float().unflatten(-1, (-1, 2))
    gr, gi, hr, hi = gf[..., 0], gf[..., 1], hf[..., 0], hf[..., 1]
    d_cos = (gr * hr + gi * hi).sum((0, 2)) if need_cos else None
    d_sin = (gi * hr - gr * hi).sum((0, 2)) if need_sin else None
    return d_cos, d_sin


def apply_rope_setup(ctx, inputs, output):
    x, cos, sin = inputs
    ctx.save_for_backward(x, cos, sin)


def apply_rope_backward(ctx, grad):
    x, cos, sin = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = _rotate_back(grad, cos, sin).to(x.dtype) if need[0] else None
    d_cos, d_sin = _table_grads(grad, x, need[1], need[2])
    return dx, d_cos, d_sin


def qk_norm_rope_setup(ctx, inputs, output):
    x, weight, eps, cos, sin, heads = inputs
    ctx.save_for_backward(x, weight, cos, sin)
    ctx.eps, ctx.heads = eps, heads


def qk_norm_rope_backward(ctx, grad):
    x, weight, cos, sin = ctx.saved_tensors
    need = ctx.needs_input_grad
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
    xhat = xf * rstd
    d_cos = d_sin = dx = dw = None
    if need[3] or need[4]:
        h = (xhat * weight.float()).unflatten(-1, (ctx.heads, -1))
        d_cos, d_sin = _table_grads(grad, h, need[3], need[4])
    gh = _rotate_back(grad, cos, sin).flatten(-2)
    if need[1]:
        dw = (gh * xhat).sum((0, 1)).to(weight.dtype)
    if need[0]:
        dxhat = gh * weight.float()
        dx = (rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))).to(x.dtype)
    return dx, dw, None, d_cos, d_sin, None
