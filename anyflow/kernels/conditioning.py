"""Triton kernels for per-frame adaLN modulate, gated residual and the fused residual + LayerNorm.

One kernel, ``_residual_ln_kernel``, covers the three ops through constexpr flags:

* ``adaln_modulate``: ``h = LN(x) * (1 + scale[f]) + shift[f]``;
* ``gated_residual``: ``x_new = x + y * gate[f]``;
* ``residual_norm``:  ``x_new = x + y * gate[f]`` (or ``x + y``), stored in ``x.dtype``; then
  ``h = LN(x_new)`` (``x_new`` as rounded to ``x.dtype``) modulated per frame or with an affine
  ``weight`` / ``bias``. One read of x, y and the modulation rows, one write of each output.

Layout: tokens of ``[B, N, d]`` are flattened to rows ``b * N + n``; a program owns ``BLOCK_M`` rows and
all ``d`` channels (``BLOCK_D = next_pow2(d)`` when it is at most :data:`MAX_BLOCK_D`, else a loop over
``BLOCK_D`` chunks: a first pass that combines per-chunk mean / M2 (Chan) and a second pass that
recomputes the residual and normalises). The frame row of a token comes from the segment table, given
as scalars (token start, row start, tokens per frame of up to 4 non-empty segments), so the per-frame
modulation ``[B, R, d]`` (any strides) is never expanded per token. Math is fp32 (bf16/fp16 are
upcast right after the load, which the Triton interpreter needs as well), LayerNorm uses the biased
variance with ``eps`` inside the rsqrt.

Entry points: the launchers ``<op>_fwd`` (bodies of the ``anyflow::triton_<op>`` ops, which
:mod:`anyflow.ops._triton` registers) and the analytic PyTorch backward in fp32 (``<op>_setup`` /
``<op>_backward`` for ``register_autograd``; not a Triton kernel; it expands the modulation per token).
The helpers :func:`launcher`, :func:`autotune_configs` and :func:`alloc_output` are shared with the
other kernel modules.
"""

import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .limits import MAX_SEGMENTS

#: True when the kernels run in Triton's CPU interpreter (decided when this module is imported).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: Largest channel block held by one program; wider rows loop over chunks of this size. Tests lower it
#: to exercise the chunked path at small d.
MAX_BLOCK_D = 8192

#: Elements per program the row-blocked kernels aim for. The interpreter's cost grows with the number
#: of programs, so it gets big tiles; on a GPU ~4k elements keeps registers low at 4-16 warps.
TILE_ELEMS = 16384 if INTERPRET else 4096


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
def autotune_configs(num_warps: Sequence[int] = (4, 8, 16)) -> List[triton.Config]:
    """A small num_warps sweep on GPU, exactly one config under the interpreter (more fail there)."""
    if INTERPRET:
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in num_warps]


def launcher(kernel):
    """How every kernel of this package is launched: ``wrap_triton(kernel)`` on GPU (a higher-order op that
    ``torch.compile`` traces into), the plain kernel under the interpreter (torch 2.11's ``wrap_triton``
    rejects the interpreter's kernels; the interpreted ops are opaque ``custom_op`` s anyway)."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def alloc_output(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (uninitialised); tests patch it to poison outputs."""
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def row_block(block_cols: int, rows) -> int:
    """Rows per program so that a tile holds about :data:`TILE_ELEMS` elements.

    Only the interpreter caps it by the row count (fewer wasted lanes in tiny tests); on GPU the
    count may be symbolic under ``torch.compile`` and the last program is masked anyway.
    """
    block = max(1, TILE_ELEMS // block_cols)
    return min(block, next_pow2(rows)) if INTERPRET else block


def segment_args(segs: Sequence[int]) -> Tuple[int, list]:
    """Flat ``[f0, n0, f1, n1, ...]`` -> ``(NSEG, [T1, T2, T3, R1, R2, R3, P0, P1, P2, P3])``.

    Segments with no frames are dropped; ``T_s`` / ``R_s`` are the first token / frame row of
    segment s and ``P_s`` its tokens per frame (segment 0 starts at token 0, row 0).
    """
    pairs = [(int(segs[i]), int(segs[i + 1])) for i in range(0, len(segs), 2)]
    pairs = [(f, n) for f, n in pairs if f > 0]
    if len(pairs) > MAX_SEGMENTS:
        raise ValueError(f"at most {MAX_SEGMENTS} non-empty segments are supported, got {pairs}")
    starts, rows, tpf = [], [], []
    tok = row = 0
    for f, n in pairs:
        starts.append(tok)
        rows.append(row)
        tpf.append(n)
        tok += f * n
        row += f
    nseg = len(pairs)
    tail = lambda v, fill, k: (v + [fill] * k)[:k]  # noqa: E731
    return nseg, tail(starts[1:], 0, 3) + tail(rows[1:], 0, 3) + tail(tpf, 1, 4)


def frame_index(segs: Sequence[int], device) -> torch.Tensor:
    """``[N]`` frame row of every token (backward only; the forward kernels never build it)."""
    idx, row = [], 0
    for i in range(0, len(segs), 2):
        f, n = int(segs[i]), int(segs[i + 1])
        if f:
            idx.append(torch.arange(row, row + f, device=device).repeat_interleave(n))
        row += f
    if not idx:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(idx)


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
#: The interpreter casts fp32 -> bf16 by truncation; GPUs round to nearest even. The kernels round
#: explicitly when interpreting so CPU results match what the GPU stores.
_ROUND_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def cast_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` -> ``DTYPE`` with round-to-nearest-even (also under the interpreter)."""
    if _ROUND_BF16:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def frame_of(n, T1, T2, T3, R1, R2, R3, P0, P1, P2, P3, NSEG: tl.constexpr):
    """Frame row of token(s) ``n`` from the segment table (up to 4 segments, statically unrolled)."""
    f = n // P0
    if NSEG > 1:
        f = tl.where(n >= T1, R1 + (n - T1) // P1, f)
    if NSEG > 2:
        f = tl.where(n >= T2, R2 + (n - T2) // P2, f)
    if NSEG > 3:
        f = tl.where(n >= T3, R3 + (n - T3) // P3, f)
    return f


@triton.jit
def _residual_chunk(
    x_ptr, y_ptr, g_ptr, xo_ptr, b, n, f, cols, mask,
    sxb, sxn, syb, syn, sgb, sgr, sgd,
    HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """fp32 ``x (+ y (* gate[f]))`` for one [BLOCK_M, BLOCK_D] chunk, rounded like the stored x_new."""
    x = tl.load(x_ptr + (b * sxb + n * sxn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + (b * syb + n * syn)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(g_ptr + (b * sgb + f * sgr)[:, None] + cols[None, :] * sgd, mask=mask, other=0.0)
            x = x + y * g.to(tl.float32)
        else:
            x = x + y
        # the LayerNorm must see x_new as stored (rounded to x.dtype), like the reference
        x = cast_to(x, xo_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _norm_chunk(
    xh, b, f, cols, cmask, mask, sh_ptr, sc_ptr, w_ptr, bi_ptr,
    ssb, ssr, ssd, scb, scr, scd,
    MODULATE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    """Per-frame modulation ``xh * (1 + scale[f]) + shift[f]`` or the affine ``xh * w + b``."""
    if MODULATE:
        sc = tl.load(sc_ptr + (b * scb + f * scr)[:, None] + cols[None, :] * scd, mask=mask, other=0.0)
        sh = tl.load(sh_ptr + (b * ssb + f * ssr)[:, None] + cols[None, :] * ssd, mask=mask, other=0.0)
        xh = xh * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)
    else:
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
            xh = xh * w.to(tl.float32)[None, :]
        if HAS_B:
            bb = tl.load(bi_ptr + cols, mask=cmask, other=0.0)
            xh = xh + bb.to(tl.float32)[None, :]
    return xh


@triton.autotune(configs=autotune_configs(), key=["D", "BLOCK_M", "BLOCK_D", "HAS_Y", "NORM"])
@triton.jit
def _residual_ln_kernel(
    x_ptr, y_ptr, g_ptr, sh_ptr, sc_ptr, w_ptr, bi_ptr, xo_ptr, ho_ptr,
    M, N, D, eps,
    sxb, sxn, syb, syn, sgb, sgr, sgd, ssb, ssr, ssd, scb, scr, scd,
    T1, T2, T3, R1, R2, R3, P0, P1, P2, P3,
    NSEG: tl.constexpr, HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, STORE_X: tl.constexpr,
    NORM: tl.constexpr, MODULATE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKED: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows = rows.to(tl.int64)
    b = rows // N
    n = rows % N
    f = frame_of(n, T1, T2, T3, R1, R2, R3, P0, P1, P2, P3, NSEG)
    out_row = rows * D
    if not CHUNKED:
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        mask = rmask[:, None] & cm[None, :]
        x = _residual_chunk(x_ptr, y_ptr, g_ptr, xo_ptr, b, n, f, cols, mask,
                            sxb, sxn, syb, syn, sgb, sgr, sgd, HAS_Y, HAS_GATE)
        if STORE_X:
            tl.store(xo_ptr + out_row[:, None] + cols[None, :], cast_to(x, xo_ptr.dtype.element_ty), mask=mask)
        if NORM:
            mean = tl.sum(x, axis=1) / D
            diff = tl.where(mask, x - mean[:, None], 0.0)
            rstd = tl.math.rsqrt(tl.sum(diff * diff, axis=1) / D + eps)
            h = _norm_chunk(diff * rstd[:, None], b, f, cols, cm, mask, sh_ptr, sc_ptr, w_ptr, bi_ptr,
                            ssb, ssr, ssd, scb, scr, scd, MODULATE, HAS_W, HAS_B)
            tl.store(ho_ptr + out_row[:, None] + cols[None, :], cast_to(h, ho_ptr.dtype.element_ty), mask=mask)
    else:
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            cm = cols < D
            mask = rmask[:, None] & cm[None, :]
            x = _residual_chunk(x_ptr, y_ptr, g_ptr, xo_ptr, b, n, f, cols, mask,
                                sxb, sxn, syb, syn, sgb, sgr, sgd, HAS_Y, HAS_GATE)
            if STORE_X:
                tl.store(xo_ptr + out_row[:, None] + cols[None, :], cast_to(x, xo_ptr.dtype.element_ty), mask=mask)
            if NORM:
                # exact mean / M2 of the chunk, merged into the running statistics (Chan et al.)
                # (all earlier chunks are full, so c0 columns have been seen; no loop-carried scalar)
                k = tl.sum(cm.to(tl.float32), axis=0)
                seen = c0 * 1.0
                cmean = tl.sum(x, axis=1) / k
                cd = tl.where(mask, x - cmean[:, None], 0.0)
                cm2 = tl.sum(cd * cd, axis=1)
                total = seen + k
                delta = cmean - mean
                mean = mean + delta * (k / total)
                m2 = m2 + cm2 + delta * delta * (seen * k / total)
        if NORM:
            rstd = tl.math.rsqrt(m2 / D + eps)
            for c0 in range(0, D, BLOCK_D):
                cols = c0 + tl.arange(0, BLOCK_D)
                cm = cols < D
                mask = rmask[:, None] & cm[None, :]
                x = _residual_chunk(x_ptr, y_ptr, g_ptr, xo_ptr, b, n, f, cols, mask,
                                    sxb, sxn, syb, syn, sgb, sgr, sgd, HAS_Y, HAS_GATE)
                xh = (x - mean[:, None]) * rstd[:, None]
                h = _norm_chunk(xh, b, f, cols, cm, mask, sh_ptr, sc_ptr, w_ptr, bi_ptr,
                                ssb, ssr, ssd, scb, scr, scd, MODULATE, HAS_W, HAS_B)
                tl.store(ho_ptr + out_row[:, None] + cols[None, :], cast_to(h, ho_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _strides3(t: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _launch(x, y, gate, shift, scale, weight, bias, segs, eps, store_x: bool, norm: bool):
    """Run ``_residual_ln_kernel``; returns ``(x_new or None, h or None)`` as contiguous tensors."""
    x = _last_dim_contiguous(x)
    y = _last_dim_contiguous(y)
    b, n, d = x.shape
    m = b * n
    x_out = alloc_output((b, n, d), x.dtype, x.device) if store_x else None
    h_out = alloc_output((b, n, d), x.dtype, x.device) if norm else None
    if m == 0 or d == 0:
        return x_out, h_out
    nseg, seg_scalars = segment_args(segs)
    block_d = next_pow2(d)
    chunked = block_d > MAX_BLOCK_D
    if chunked:
        block_d = next_pow2(MAX_BLOCK_D)
    block_m = row_block(block_d, m)
    sxb, sxn, _ = x.stride()
    syb, syn, _ = _strides3(y)
    dummy = x
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    launcher(_residual_ln_kernel)[grid](
        x, dummy if y is None else y, dummy if gate is None else gate,
        dummy if shift is None else shift, dummy if scale is None else scale,
        dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if x_out is None else x_out, dummy if h_out is None else h_out,
        m, n, d, eps,
        sxb, sxn, syb, syn, *_strides3(gate), *_strides3(shift), *_strides3(scale),
        *seg_scalars,
        NSEG=nseg, HAS_Y=y is not None, HAS_GATE=gate is not None, STORE_X=store_x, NORM=norm,
        MODULATE=shift is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, CHUNKED=chunked,
    )
    return x_out, h_out


# ----------------------------------------------------------------------------------------------
# forward launchers (the bodies of the anyflow::triton_* ops, anyflow/ops/_triton.py)
# ----------------------------------------------------------------------------------------------
def adaln_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, segs: List[int],
                       eps: float) -> torch.Tensor:
    return _launch(x, None, None, shift, scale, None, None, segs, eps, store_x=False, norm=True)[1]


def gated_residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, segs: List[int]) -> torch.Tensor:
    return _launch(x, y, gate, None, None, None, None, segs, 0.0, store_x=True, norm=False)[0]


def residual_norm_fwd(
    x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor], segs: List[int], eps: float,
    shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, y, gate, shift, scale, weight, bias, segs, eps, store_x=True, norm=True)


# ----------------------------------------------------------------------------------------------
# autograd: analytic backward in PyTorch (fp32), modulation expanded per token here only
# ----------------------------------------------------------------------------------------------
def _per_token(t, idx):
    return t.float().index_select(1, idx)


def _per_frame_sum(t, idx, rows):
    b, _, d = t.shape
    return t.new_zeros(b, rows, d).index_add_(1, idx, t)


def _layer_norm_stats(x, eps):
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    return (xf - mean) * rstd, rstd


def _layer_norm_backward(dxhat, xhat, rstd):
    return rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))


def _cast(g, ref):
    return None if g is None else g.to(ref.dtype)


def _modulated_ln_backward(g, x, shift, scale, idx, eps, need):
    """Grads of ``LN(x) * (1 + scale[f]) + shift[f]`` w.r.t. (x, shift, scale), fp32; ``need`` masks them."""
    xhat, rstd = _layer_norm_stats(x, eps)
    rows = shift.shape[1]
    d_shift = _per_frame_sum(g, idx, rows) if need[1] else None
    d_scale = _per_frame_sum(g * xhat, idx, rows) if need[2] else None
    dx = _layer_norm_backward(g * (1 + _per_token(scale, idx)), xhat, rstd) if need[0] else None
    return dx, d_shift, d_scale


def adaln_modulate_setup(ctx, inputs, output):
    x, shift, scale, segs, eps = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.segs, ctx.eps = list(segs), eps


def adaln_modulate_backward(ctx, grad):
    x, shift, scale = ctx.saved_tensors
    idx = frame_index(ctx.segs, x.device)
    need = ctx.needs_input_grad[:3]
    dx, dsh, dsc = _modulated_ln_backward(grad.float(), x, shift, scale, idx, ctx.eps, need)
    return _cast(dx, x), _cast(dsh, shift), _cast(dsc, scale), None, None


def gated_residual_setup(ctx, inputs, output):
    x, y, gate, segs = inputs
    ctx.save_for_backward(y, gate)
    ctx.segs = list(segs)
    ctx.x_dtype = x.dtype


def gated_residual_backward(ctx, grad):
    y, gate = ctx.saved_tensors
    idx = frame_index(ctx.segs, y.device)
    g = grad.float()
    need = ctx.needs_input_grad
    dx = grad.to(ctx.x_dtype) if need[0] else None
    dy = _cast(g * _per_token(gate, idx), y) if need[1] else None
    dgate = _cast(_per_frame_sum(g * y.float(), idx, gate.shape[1]), gate) if need[2] else None
    return dx, dy, dgate, None


def residual_norm_setup(ctx, inputs, output):
    x, y, gate, segs, eps, shift, scale, weight, bias = inputs
    ctx.save_for_backward(output[0], y, gate, shift, scale, weight, bias)
    ctx.segs, ctx.eps, ctx.x_dtype = list(segs), eps, x.dtype


def residual_norm_backward(ctx, grad_x, grad_h):
    x_new, y, gate, shift, scale, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    idx = frame_index(ctx.segs, x_new.device)
    d_x_new = torch.zeros(x_new.shape, dtype=torch.float32, device=x_new.device)
    if grad_x is not None:
        d_x_new = d_x_new + grad_x.float()
    d_shift = d_scale = d_w = d_b = None
    if grad_h is not None:
        gh = grad_h.float()
        if shift is not None:
            dx, d_shift, d_scale = _modulated_ln_backward(gh, x_new, shift, scale, idx, ctx.eps,
                                                          (True, need[5], need[6]))
        else:
            xhat, rstd = _layer_norm_stats(x_new, ctx.eps)
            if weight is not None and need[7]:
                d_w = (gh * xhat).sum((0, 1))
            if bias is not None and need[8]:
                d_b = gh.sum((0, 1))
            dx = _layer_norm_backward(gh if weight is None else gh * weight.float(), xhat, rstd)
        d_x_new = d_x_new + dx
    dx = d_x_new.to(ctx.x_dtype) if need[0] else None
    dy = dgate = None
    if gate is None:
        dy = _cast(d_x_new, y) if need[1] else None
    else:
        dy = _cast(d_x_new * _per_token(gate, idx), y) if need[1] else None
        dgate = _cast(_per_frame_sum(d_x_new * y.float(), idx, gate.shape[1]), gate) if need[2] else None
    return (dx, dy, dgate, None, None, _cast(d_shift, shift), _cast(d_scale, scale), _cast(d_w, weight),
            _cast(d_b, bias))
