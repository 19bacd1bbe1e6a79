"""Triton kernels of the FAR attention ops: segmented-KV forward, chunk-causal forward and backward.

Layouts are ``[B, H, L, D]`` with any strides except a unit stride on ``D`` (the caller checks that).
Everything here is FlashAttention-2 style (online softmax over key tiles, fp32 accumulation, the
softmax scale folded into one multiply in the base-2 domain so the inner loop uses ``exp2``); the
structure follows the Triton fused-attention tutorial (``python/tutorials/06-fused-attention.py``),
the code is our own.

* ``segmented_attention_fwd``: one query tile against up to :data:`MAX_SEGMENTS` KV segments that live
  in different tensors (compressed cache, full cache, current chunk). Each segment is read through its
  own base pointer and strides, so cache views are never copied or concatenated; segments that happen
  to be adjacent views of one buffer are first merged into one view (fewer ragged tail tiles).
* ``chunk_causal_fwd``: the block-sparse chunk-causal mask given as ranges. The host turns the layout
  into a *program table*: one program per (query group, query tile), so a program never mixes groups,
  with a CSR list of the group's key ranges. Programs iterate only over those ranges: fully masked key
  tiles are never visited, and the only masking is on the ragged tail tile of each range.
* ``chunk_causal_bwd``: FA2 backward. A preprocess computes ``delta = rowsum(dO * O) - dLSE``; dK/dV
  run one program per key tile over the query ranges that attend that tile (a second, "transposed"
  table whose key tiles never straddle a range boundary), and dQ reuses the forward table. Every
  output row is owned by exactly one program: no atomics, deterministic.

Every launch is one kernel launch per op call (all groups, heads and batches in one grid). Host tables
are cached per (layout, block size, device). Launches go through :func:`anyflow.kernels.conditioning.launcher`
(``torch.library.wrap_triton`` on GPU) so the ops that call them can be ``torch.library.triton_op`` s that
torch.compile traces.

Under ``TRITON_INTERPRET=1`` (CPU tests) the constexpr ``INTERPRETED`` works around two interpreter
bugs so that the CPU results carry the GPU's rounding: every ``tl.dot`` upcasts its operands to fp32
(the interpreter's bf16 dot multiplies raw bits), and fp32 -> bf16 casts round to nearest even by hand
(the interpreter truncates, which doubles the bf16 error). The autotuners get exactly one config there.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .conditioning import INTERPRET, launcher
from .limits import MAX_SEGMENTS

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------------------
# tile helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, INTERPRETED: tl.constexpr, IEEE: tl.constexpr):
    # INTERPRETED: the interpreter's bf16 dot multiplies raw bits; fp32 operands are exact there.
    # IEEE (fp32 inputs): the default tf32 would miss the fp32 tolerance by orders of magnitude.
    if INTERPRETED:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    # fp32 -> dtype with round-to-nearest-even. GPUs do that; the interpreter truncates fp32 -> bf16
    # (2x the rounding error of the kernel on a GPU), so there we add the RTNE bias to the bits first.
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits += ((bits >> 16) & 1) + 0x7FFF
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load_rows(base, rows, stride, row_end, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    # A [rows, BLOCK_D] tile; masks only what can be out of range so full tiles load unmasked.
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=(rows < row_end)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < row_end)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_rows(base, rows, stride, row_end, offs_d, x,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr):
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    x = _cast(x, base.dtype.element_ty, INTERPRETED)
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, x, mask=(rows < row_end)[:, None])
    else:
        tl.store(ptrs, x, mask=(rows < row_end)[:, None] & (offs_d < HEAD_DIM)[None, :])


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, cols, hi, offs_d, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr,
                 INTERPRETED: tl.constexpr, IEEE: tl.constexpr):
    # One key tile of the online softmax; m_i, l_i are in the base-2 domain (scores * scale * log2 e).
    k = _load_rows(k_base, cols, stride_kn, hi, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
    v = _load_rows(v_base, cols, stride_vn, hi, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
    s = _dot(q, tl.trans(k), INTERPRETED, IEEE) * qk_scale
    if MASK_N:
        s = tl.where((cols < hi)[None, :], s, float("-inf"))
    # A tile always holds >= 1 valid key, so m_new is finite and exp2(-inf - m_new) = 0 on the first tile.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # P is rounded to the value dtype for the tensor-core P @ V, as every FA2 kernel does.
    acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, INTERPRETED), v, INTERPRETED, IEEE)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  INTERPRETED: tl.constexpr, IEEE: tl.constexpr):
    # Keys [lo, hi): full tiles without any mask, then at most one masked tail tile.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    full_end = lo + (hi - lo) // BLOCK_N * BLOCK_N
    for start in range(lo, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start + offs_n, hi,
                                     offs_d, qk_scale, HEAD_DIM, BLOCK_D, False, INTERPRETED, IEEE)
    if full_end < hi:
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, full_end + offs_n, hi,
                                     offs_d, qk_scale, HEAD_DIM, BLOCK_D, True, INTERPRETED, IEEE)
    return acc, m_i, l_i


@triton.jit
def _finish(acc, m_i, l_i, o_base, stride_om, lse_ptrs, rows, row_end, offs_d,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr):
    # A query that sees no key at all (a layout group without ranges) gets 0 and lse = -inf, not 0/0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    _store_rows(o_base, rows, stride_om, row_end, offs_d, acc / l_safe[:, None], HEAD_DIM, BLOCK_D, INTERPRETED)
    tl.store(lse_ptrs, (m_i + tl.log2(l_safe)) * _LN2, mask=rows < row_end)


def _configs(gpu, interpret):
    """Autotune configs: a short list on the GPU, exactly one under the interpreter (it cannot bench)."""
    if INTERPRET:
        return [triton.Config(interpret, num_warps=1, num_stages=1)]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in gpu]


@triton.autotune(
    configs=_configs(
        [({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 3), ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
         ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3), ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3)],
        {"BLOCK_M": 32, "BLOCK_N": 16},
    ),
    key=["HEAD_DIM", "Lq", "IEEE"],
)
@triton.jit
def _segmented_fwd_kernel(
    Q, O, LSE,
    K0, V0, K1, V1, K2, V2, K3, V3,
    L0, L1, L2, L3,
    sk0b, sk0h, sk0n, sv0b, sv0h, sv0n,
    sk1b, sk1h, sk1n, sv1b, sv1h, sv1n,
    sk2b, sk2h, sk2n, sv2b, sv2h, sv2n,
    sk3b, sk3h, sk3n, sv3b, sv3h, sv3n,
    sqb, sqh, sqm, sob, soh, som,
    H, Lq, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SEG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    # int64 head offsets: a [layers, B, H, cap, D] cache view may sit far into its buffer.
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqm, Lq, offs_d, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The segments are separate pointer arguments (not an array) so each keeps its own strides; the
    # constexpr NUM_SEG drops the unused ones at compile time. Same online softmax across segments =
    # one softmax over their union, no log-sum-exp merge needed.
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, K0 + b * sk0b + h * sk0h, V0 + b * sv0b + h * sv0h, sk0n, sv0n,
                                  0, L0, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, INTERPRETED, IEEE)
    if NUM_SEG > 1:
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, K1 + b * sk1b + h * sk1h, V1 + b * sv1b + h * sv1h,
                                      sk1n, sv1n, 0, L1, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, INTERPRETED, IEEE)
    if NUM_SEG > 2:
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, K2 + b * sk2b + h * sk2h, V2 + b * sv2b + h * sv2h,
                                      sk2n, sv2n, 0, L2, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, INTERPRETED, IEEE)
    if NUM_SEG > 3:
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, K3 + b * sk3b + h * sk3h, V3 + b * sv3b + h * sv3h,
                                      sk3n, sv3n, 0, L3, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, INTERPRETED, IEEE)
    _finish(acc, m_i, l_i, O + b * sob + h * soh, som, LSE + bh * Lq + rows, rows, Lq, offs_d,
            HEAD_DIM, BLOCK_D, INTERPRETED)


@triton.jit
def _program(PROG, H):
    # This program's (batch * head, batch, head) and its PROG row (lo, hi, r_begin, r_end).
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    lo = tl.load(PROG + 4 * pid)
    hi = tl.load(PROG + 4 * pid + 1)
    r_begin = tl.load(PROG + 4 * pid + 2)
    r_end = tl.load(PROG + 4 * pid + 3)
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), lo, hi, r_begin, r_end


@triton.autotune(
    configs=_configs(
        [({"BLOCK_N": 64}, 4, 3), ({"BLOCK_N": 64}, 8, 3), ({"BLOCK_N": 128}, 8, 3), ({"BLOCK_N": 32}, 4, 2)],
        {"BLOCK_N": 16},
    ),
    key=["HEAD_DIM", "Lq", "IEEE", "BLOCK_M"],
)
@triton.jit
def _chunk_fwd_kernel(
    Q, K, V, O, LSE, PROG, RANGES,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    H, Lq, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETED: tl.constexpr, IEEE: tl.constexpr,
):
    # PROG[pid] = (q_lo, q_hi, r_begin, r_end): this program's query rows (inside one group) and the
    # CSR slice RANGES[r_begin:r_end] of (k_lo, k_hi) key ranges that group attends to.
    bh, b, h, q_lo, q_hi, r_begin, r_end = _program(PROG, H)
    rows = q_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqm, q_hi, offs_d, HEAD_DIM, BLOCK_D, True)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r in range(r_begin, r_end):
        k_lo = tl.load(RANGES + 2 * r)
        k_hi = tl.load(RANGES + 2 * r + 1)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, skn, svn, k_lo, k_hi, qk_scale,
                                      HEAD_DIM, BLOCK_D, BLOCK_N, INTERPRETED, IEEE)
    _finish(acc, m_i, l_i, O + b * sob + h * soh, som, LSE + bh * Lq + rows, rows, q_hi, offs_d,
            HEAD_DIM, BLOCK_D, INTERPRETED)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    sob, soh, som, sdb, sdh, sdm, slb, slh, slm,
    H, Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    # delta_i = sum_d dO_id O_id - dLSE_i. dS = P * (dP - delta): the dLSE term is the gradient
    # through the returned log-sum-exp (d lse_i / d s_ij = P_ij), so it folds into delta for free.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh, rows, som, Lq, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do = _load_rows(DO + b * sdb + h * sdh, rows, sdm, Lq, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * slb + h * slh + rows * slm, mask=rows < Lq, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * Lq + rows, delta, mask=rows < Lq)


@triton.autotune(
    configs=_configs([({"BLOCK_M": 32}, 4, 2), ({"BLOCK_M": 64}, 4, 2), ({"BLOCK_M": 64}, 8, 3)], {"BLOCK_M": 16}),
    key=["HEAD_DIM", "Lq", "IEEE", "BLOCK_N"],
)
@triton.jit
def _chunk_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, PROG, RANGES,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, Lq, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETED: tl.constexpr, IEEE: tl.constexpr,
):
    # PROG[pid] = (k_lo, k_hi, r_begin, r_end): a key tile inside one elementary key interval (every
    # query range in RANGES[r_begin:r_end] attends to all of it), so only query-row tails need masks.
    # Works in the transposed orientation (keys as rows) so dK, dV accumulate in registers.
    bh, b, h, k_lo, k_hi, r_begin, r_end = _program(PROG, H)
    cols = k_lo + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * skb + h * skh, cols, skn, k_hi, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b * svb + h * svh, cols, svn, k_hi, offs_d, HEAD_DIM, BLOCK_D, True)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    stat_base = bh * Lq
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for r in range(r_begin, r_end):
        q_lo = tl.load(RANGES + 2 * r)
        q_hi = tl.load(RANGES + 2 * r + 1)
        for start in range(q_lo, q_hi, BLOCK_M):
            rows = start + offs_m
            valid = rows < q_hi
            q = _load_rows(q_base, rows, sqm, q_hi, offs_d, HEAD_DIM, BLOCK_D, True)
            do = _load_rows(do_base, rows, sdm, q_hi, offs_d, HEAD_DIM, BLOCK_D, True)
            lse2 = tl.load(LSE + stat_base + rows, mask=valid, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + stat_base + rows, mask=valid, other=0.0)
            # P^T recomputed from the saved log-sum-exp: no running max, no rescaling.
            p_t = tl.exp2(_dot(k, tl.trans(q), INTERPRETED, IEEE) * qk_scale - lse2[None, :])
            p_t = tl.where(valid[None, :], p_t, 0.0)
            dv += _dot(_cast(p_t, do.dtype, INTERPRETED), do, INTERPRETED, IEEE)
            dp_t = _dot(v, tl.trans(do), INTERPRETED, IEEE)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(_cast(ds_t, q.dtype, INTERPRETED), q, INTERPRETED, IEEE)
    _store_rows(DK + b * sdkb + h * sdkh, cols, sdkn, k_hi, offs_d, dk * sm_scale, HEAD_DIM, BLOCK_D, INTERPRETED)
    _store_rows(DV + b * sdvb + h * sdvh, cols, sdvn, k_hi, offs_d, dv, HEAD_DIM, BLOCK_D, INTERPRETED)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, cols, hi, offs_d, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr,
             INTERPRETED: tl.constexpr, IEEE: tl.constexpr):
    k = _load_rows(k_base, cols, stride_kn, hi, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
    v = _load_rows(v_base, cols, stride_vn, hi, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
    p = tl.exp2(_dot(q, tl.trans(k), INTERPRETED, IEEE) * qk_scale - lse2[:, None])
    if MASK_N:
        p = tl.where((cols < hi)[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), INTERPRETED, IEEE)
    ds = p * (dp - delta[:, None])
    return dq + _dot(_cast(ds, k.dtype, INTERPRETED), k, INTERPRETED, IEEE)


@triton.autotune(
    configs=_configs([({"BLOCK_N": 32}, 4, 2), ({"BLOCK_N": 64}, 4, 3), ({"BLOCK_N": 64}, 8, 3)], {"BLOCK_N": 16}),
    key=["HEAD_DIM", "Lq", "IEEE", "BLOCK_M"],
)
@triton.jit
def _chunk_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, PROG, RANGES,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sdqb, sdqh, sdqm,
    H, Lq, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETED: tl.constexpr, IEEE: tl.constexpr,
):
    # Same program table as the forward: (query tile of one group) x (that group's key ranges).
    bh, b, h, q_lo, q_hi, r_begin, r_end = _program(PROG, H)
    rows = q_lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqm, q_hi, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b * sdb + h * sdh, rows, sdm, q_hi, offs_d, HEAD_DIM, BLOCK_D, True)
    lse2 = tl.load(LSE + bh * Lq + rows, mask=rows < q_hi, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * Lq + rows, mask=rows < q_hi, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r in range(r_begin, r_end):
        k_lo = tl.load(RANGES + 2 * r)
        k_hi = tl.load(RANGES + 2 * r + 1)
        full_end = k_lo + (k_hi - k_lo) // BLOCK_N * BLOCK_N
        for start in range(k_lo, full_end, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, skn, svn, start + offs_n, k_hi, offs_d, qk_scale,
                          HEAD_DIM, BLOCK_D, False, INTERPRETED, IEEE)
        if full_end < k_hi:
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, skn, svn, full_end + offs_n, k_hi, offs_d,
                          qk_scale, HEAD_DIM, BLOCK_D, True, INTERPRETED, IEEE)
    _store_rows(DQ + b * sdqb + h * sdqh, rows, sdqm, q_hi, offs_d, dq * sm_scale, HEAD_DIM, BLOCK_D, INTERPRETED)


# ------------------------------------------------------------------------------------------------
# host side: program tables
# ------------------------------------------------------------------------------------------------
def _merge(ranges, limit):
    """Sorted, non-empty, non-touching ranges clipped to ``[0, limit)``."""
    out = []
    for s, e in sorted((max(0, int(s)), min(limit, int(e))) for s, e in ranges):
        if s >= e:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _pack(progs, ranges):
    # Heaviest programs first (longest-processing-time order): the light ones fill the last wave.
    progs = sorted(progs, key=lambda p: -p[0])
    flat = [x for p in progs for x in p[1:]] + [x for r in ranges for x in r]
    return tuple(flat), len(progs)


@functools.lru_cache(maxsize=256)
def query_tiles(groups, kv_len: int, block_m: int):
    """Program table of the forward and dQ kernels.

    One program per (group, ``block_m`` query rows of that group) - a tile never spans two groups - as
    ``(q_lo, q_hi, r_begin, r_end)``, followed by the ``(k_lo, k_hi)`` ranges the programs point into.

    Returns:
        ``(flat, num_programs)``: ``flat[:4 * P]`` the programs, ``flat[4 * P:]`` the ranges.
    """
    progs, ranges = [], []
    for qs, qe, rs in groups:
        rs = _merge(rs, kv_len)
        r0 = len(ranges)
        ranges.extend(rs)
        work = sum(e - s for s, e in rs)
        for m in range(int(qs), int(qe), block_m):
            progs.append((work, m, min(m + block_m, int(qe)), r0, len(ranges)))
    return _pack(progs, ranges)


@functools.lru_cache(maxsize=256)
def key_tiles(groups, kv_len: int, block_n: int):
    """Program table of the dK/dV kernel (the layout transposed).

    The key axis is cut at every range boundary of every group into elementary intervals, inside which
    the set of attending groups is constant; each interval is tiled by ``block_n`` keys, and a program
    ``(k_lo, k_hi, r_begin, r_end)`` points to the merged query ranges of those groups. Keys nobody
    attends to still get a program (with no ranges) so that their dK, dV are written as zeros.

    Returns:
        ``(flat, num_programs)`` laid out as in :func:`query_tiles`.
    """
    gr = [(int(qs), int(qe), _merge(rs, kv_len)) for qs, qe, rs in groups]
    points = sorted({0, kv_len} | {x for _, _, rs in gr for r in rs for x in r})
    progs, ranges, index = [], [], {}
    for a, b in zip(points, points[1:]):
        attending = tuple(_merge([(qs, qe) for qs, qe, rs in gr if any(s <= a and b <= e for s, e in rs)], 1 << 62))
        if attending not in index:
            index[attending] = (len(ranges), len(ranges) + len(attending))
            ranges.extend(attending)
        r0, r1 = index[attending]
        work = sum(e - s for s, e in attending)
        for n in range(a, b, block_n):
            progs.append((work, n, min(n + block_n, b), r0, r1))
    return _pack(progs, ranges)


def _traced(t: torch.Tensor) -> bool:
    """True for the fake / functional tensors of torch.compile, export and make_fx tracing."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor))


@functools.lru_cache(maxsize=128)
def _device_table(flat, device):
    return torch.tensor(flat, dtype=torch.int32, device=device)


def _table(builder, groups, kv_len, block, ref):
    """(programs, ranges, num_programs) as int32 views of one device tensor, cached for real tensors."""
    # int(): under torch.compile with dynamic shapes kv_len is a SymInt, which the lru_caches cannot
    # hash; the table needs the concrete length anyway (this specializes it, as the layout does).
    flat, n = builder(groups, int(kv_len), int(block))
    # While tracing, a cached real tensor must not leak into the graph: build it under the trace's mode.
    t = torch.tensor(flat, dtype=torch.int32, device=ref.device) if _traced(ref) else _device_table(flat, ref.device)
    return t[: 4 * n], t[4 * n :], n


# ------------------------------------------------------------------------------------------------
# host side: launchers
# ------------------------------------------------------------------------------------------------
def _block_d(head_dim: int) -> int:
    # tl.dot needs >= 16 along the reduction; non powers of two (e.g. 12) are masked up.
    return max(16, triton.next_power_of_2(head_dim))


def _query_block(dtype: torch.dtype, head_dim: int) -> int:
    """Rows per program of the table-driven forward / dQ kernels (fixed on the host: the table depends on it)."""
    if INTERPRET:
        return 32
    return 64 if dtype == torch.float32 or head_dim > 128 else 128


def _key_block(dtype: torch.dtype, head_dim: int) -> int:
    """Keys per program of the dK/dV kernel."""
    if INTERPRET:
        return 32
    return 64 if dtype == torch.float32 or head_dim > 128 else 128


def _common(q):
    B, H, Lq, D = q.shape
    return B, H, Lq, D, _block_d(D), q.dtype == torch.float32


def _check_out(name, t, shape, dtype, device):
    if t is not None and (tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device):
        raise ValueError(
            f"{name} must be {tuple(shape)} {dtype} on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}"
        )


def _outputs(q, out, lse):
    B, H, Lq, _ = q.shape
    _check_out("out", out, q.shape, q.dtype, q.device)
    _check_out("lse", lse, (B, H, Lq), torch.float32, q.device)
    if lse is not None and not lse.is_contiguous():
        raise ValueError("lse must be contiguous")
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device) if lse is None else lse
    return out, lse


def _follows(a: torch.Tensor, b: torch.Tensor):
    """``a`` extended by ``b`` as one strided view if ``b`` continues ``a`` along tokens in the same buffer."""
    if (
        a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        or a.stride() != b.stride()
        or a.shape[:2] != b.shape[:2]
        or b.storage_offset() != a.storage_offset() + a.shape[2] * a.stride(2)
    ):
        return None
    return a.as_strided((a.shape[0], a.shape[1], a.shape[2] + b.shape[2], a.shape[3]), a.stride(), a.storage_offset())


def _segments(q, keys, values):
    """Non-empty segments, adjacent views of one buffer merged (never copied)."""
    segs = [(k, v) for k, v in zip(keys, values) if k.shape[2] > 0]
    if not segs:
        raise ValueError("segmented_attention needs at least one key")
    if _traced(q):  # storage pointers do not exist while tracing; merging is only an optimisation
        return segs
    merged = [segs[0]]
    for k, v in segs[1:]:
        mk, mv = _follows(merged[-1][0], k), _follows(merged[-1][1], v)
        if mk is not None and mv is not None:
            merged[-1] = (mk, mv)
        else:
            merged.append((k, v))
    return merged


def segmented_attention_fwd(q, keys, values, scale: float, *, out=None, lse=None):
    """Softmax attention of ``q`` ``[B, H, Lq, D]`` over the union of up to :data:`MAX_SEGMENTS` KV segments.

    Args:
        keys, values: sequences of ``[B, H, Lk_i, D]`` (any strides with unit stride on ``D``; empty ones
            are skipped).
        out, lse: optional preallocated ``[B, H, Lq, D]`` (q.dtype) and contiguous ``[B, H, Lq]`` fp32.

    Returns:
        ``(out, lse)``; ``lse`` is the natural-log log-sum-exp of the scaled scores.
    """
    B, H, Lq, D, BLOCK_D, ieee = _common(q)
    out, lse = _outputs(q, out, lse)
    segs = _segments(q, keys, values)
    if len(segs) > MAX_SEGMENTS:
        raise ValueError(f"at most {MAX_SEGMENTS} non-empty KV segments are supported, got {len(segs)}")
    if Lq == 0 or B * H == 0:
        return out, lse
    num_seg = len(segs)
    segs = segs + [segs[0]] * (MAX_SEGMENTS - num_seg)  # placeholders, compiled out by NUM_SEG
    ptrs, lens, strides = [], [], []
    for k, v in segs:
        ptrs += [k, v]
        lens.append(k.shape[2])
        strides += [k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)]
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    launcher(_segmented_fwd_kernel)[grid](
        q, out, lse, *ptrs, *lens, *strides,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, Lq, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, NUM_SEG=num_seg, INTERPRETED=INTERPRET, IEEE=ieee,
    )
    return out, lse


def chunk_causal_fwd(q, k, v, groups, scale: float, *, out=None, lse=None, block_m=None):
    """Chunk-causal attention; ``groups`` is :attr:`AttentionLayout.groups` (a hashable tuple).

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]`` (unit stride on ``D``).
        out, lse: optional preallocated outputs as in :func:`segmented_attention_fwd`.
        block_m: query rows per program (default per dtype / head dim; tests use it to vary tiling).

    Returns:
        ``(out, lse)``.
    """
    B, H, Lq, D, BLOCK_D, ieee = _common(q)
    out, lse = _outputs(q, out, lse)
    block_m = block_m or _query_block(q.dtype, D)
    prog, ranges, n = _table(query_tiles, groups, k.shape[2], block_m, q)
    if n == 0 or B * H == 0:
        return out, lse
    launcher(_chunk_fwd_kernel)[(n, B * H)](
        q, k, v, out, lse, prog, ranges,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, Lq, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=block_m, INTERPRETED=INTERPRET, IEEE=ieee,
    )
    return out, lse


def chunk_causal_bwd(q, k, v, out, lse, dout, dlse, groups, scale: float, *, dq=None, dk=None, dv=None,
                     block_m=None, block_n=None):
    """Gradients ``(dq, dk, dv)`` of :func:`chunk_causal_fwd` for ``dout`` (and optionally ``dlse``).

    Args:
        out, lse: the forward's outputs (``lse`` contiguous fp32 ``[B, H, Lq]``).
        dout: ``[B, H, Lq, D]`` with unit stride on ``D``; dlse: ``[B, H, Lq]`` or None (any strides).
        dq, dk, dv: optional preallocated outputs shaped like q, k, v.
        block_m, block_n: query rows per dQ program and keys per dK/dV program (defaults per dtype).
    """
    B, H, Lq, D, BLOCK_D, ieee = _common(q)
    Lk = k.shape[2]
    for name, t, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_out(name, t, ref.shape, ref.dtype, ref.device)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if B * H == 0:
        return dq, dk, dv
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    lse = lse.contiguous()
    if Lq:
        pre_block = 64 if not INTERPRET else 32
        dl = dlse if dlse is not None else lse  # placeholder pointer, compiled out by HAS_DLSE
        launcher(_bwd_preprocess_kernel)[(triton.cdiv(Lq, pre_block), B * H)](
            out, dout, dl, delta,
            out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dl.stride(0), dl.stride(1), dl.stride(2),
            H, Lq,
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=pre_block, HAS_DLSE=dlse is not None,
        )
    qkv_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    block_n = block_n or _key_block(q.dtype, D)
    prog, ranges, n = _table(key_tiles, groups, Lk, block_n, q)
    if n:
        launcher(_chunk_bwd_dkdv_kernel)[(n, B * H)](
            q, k, v, dout, lse, delta, dk, dv, prog, ranges, *qkv_strides,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            H, Lq, scale, scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_N=block_n, INTERPRETED=INTERPRET, IEEE=ieee,
        )
    block_m = block_m or _query_block(q.dtype, D)
    prog, ranges, n = _table(query_tiles, groups, Lk, block_m, q)
    if n:
        launcher(_chunk_bwd_dq_kernel)[(n, B * H)](
            q, k, v, dout, lse, delta, dq, prog, ranges, *qkv_strides,
            dq.stride(0), dq.stride(1), dq.stride(2),
            H, Lq, scale, scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=block_m, INTERPRETED=INTERPRET, IEEE=ieee,
        )
    return dq, dk, dv
