// FAR attention forward (see attention.h): flash-attention tiles over a plan of query groups and key
// ranges, fp32 online softmax in base 2, two implementations behind one dispatch.
//
// * Tensor-core path (bf16/fp16, head_dim 64/128, sm_80+): 4 warps x 16 query rows = 64-row tiles,
//   64-key tiles double-buffered in shared memory with cp.async (zero-filled past a range end),
//   S = Q K^T and O += P V with mma.sync.m16n8k16 (fp32 accumulators in registers, FlashAttention-2
//   register layout: the S accumulator is reused as the A operand of P V), V read with ldmatrix.trans.
// * SIMT path (any dtype, head_dim <= 256): 4 warps x 4 rows = 16-row tiles, 32-key tiles in fp32
//   shared memory; lane j scores key j, p is broadcast with shuffles for the P V update.
// Both skip everything outside the plan's ranges; inside a range only the tail of the last key tile is
// masked. The kernel parameters carry the whole plan (< 4 KiB), so no device-side table or host sync
// is needed and launches are CUDA-graph safe.
#include <cuda_runtime.h>

#include <atomic>

#include "attention.h"
#include "common.cuh"

namespace anyflow {
namespace {

struct AttnParams {
  anyflow_attention_args args;
  anyflow_attn_plan plan;
  float scale_log2;  // softmax scale * log2(e)
};
static_assert(sizeof(AttnParams) <= 4000, "kernel parameters must stay below 4 KiB");

constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// KV segment `seg` with compile-time indices only (see attn_work).
struct KV {
  const char* k;
  const char* v;
  int64_t k_sl, v_sl;
};

template <typename T>
__device__ __forceinline__ KV kv_segment(const anyflow_attention_args& a, int seg, int64_t b, int64_t h) {
  KV r = {nullptr, nullptr, 0, 0};
#pragma unroll
  for (int s = 0; s < ANYFLOW_ATTN_MAX_SEGMENTS; ++s) {
    if (s == seg) {
      const anyflow_kv_segment& g = a.segments[s];
      r.k = reinterpret_cast<const char*>(static_cast<const T*>(g.k) + b * g.k_stride_b + h * g.k_stride_h);
      r.v = reinterpret_cast<const char*>(static_cast<const T*>(g.v) + b * g.v_stride_b + h * g.v_stride_h);
      r.k_sl = g.k_stride_l;
      r.v_sl = g.v_stride_l;
    }
  }
  return r;
}

// The key-tile walk of a work item (Cursor, first_tile, next_tile, count_tiles, range_end) is in
// attention.h, shared with the host tests.

// ---------------------------------------------------------------------------------------------------
// SIMT path
// ---------------------------------------------------------------------------------------------------
constexpr int kSimtRows = 4;  // query rows per warp
constexpr int kSimtWarps = 4;
constexpr int kSimtBM = kSimtRows * kSimtWarps;
constexpr int kSimtBN = 32;

inline size_t simt_smem_bytes(int64_t d) {
  return sizeof(float) * static_cast<size_t>(kSimtBM * d + kSimtBN * (d + 1) + kSimtBN * d);
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kSimtWarps * 32) attention_simt_kernel(const AttnParams p) {
  constexpr int DV = DMAX / 32;  // output elements per lane and row
  const anyflow_attention_args& a = p.args;
  const int D = static_cast<int>(a.head_dim);
  extern __shared__ float fsm[];
  float* sQ = fsm;                    // [BM][D]
  float* sK = sQ + kSimtBM * D;       // [BN][D + 1] (padded: lane j reads row j)
  float* sV = sK + kSimtBN * (D + 1);  // [BN][D]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
  const AttnWork w = attn_work(p.plan, static_cast<int32_t>(blockIdx.x));

  const T* qb = static_cast<const T*>(a.q) + b * a.q_stride_b + h * a.q_stride_h;
  for (int i = tid; i < kSimtBM * D; i += blockDim.x) {
    const int row = i / D, d = i % D, qr = w.q0 + row;
    sQ[i] = qr < w.q1 ? to_float(qb[static_cast<int64_t>(qr) * a.q_stride_l + d]) : 0.f;
  }

  float o[kSimtRows][DV];
  float m[kSimtRows], l[kSimtRows];
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < DV; ++i) o[r][i] = 0.f;
  }

  for (int rg = 0; rg < w.num_ranges; ++rg) {
    const int32_t ks = w.k_start[rg], ke = w.k_end[rg];
    const KV kv = kv_segment<T>(a, p.plan.segmented ? rg : 0, b, h);
    const T* kp = reinterpret_cast<const T*>(kv.k);
    const T* vp = reinterpret_cast<const T*>(kv.v);
    for (int32_t k0 = ks; k0 < ke; k0 += kSimtBN) {
      __syncthreads();  // previous tile fully consumed (and sQ written, on the first tile)
      for (int i = tid; i < kSimtBN * D; i += blockDim.x) {
        const int j = i / D, d = i % D, key = k0 + j;
        const bool ok = key < ke;
        sK[j * (D + 1) + d] = ok ? to_float(kp[static_cast<int64_t>(key) * kv.k_sl + d]) : 0.f;
        sV[j * D + d] = ok ? to_float(vp[static_cast<int64_t>(key) * kv.v_sl + d]) : 0.f;
      }
      __syncthreads();

      float s[kSimtRows];
#pragma unroll
      for (int r = 0; r < kSimtRows; ++r) s[r] = 0.f;
      const float* krow = sK + lane * (D + 1);
      const float* q0 = sQ + warp * kSimtRows * D;
      for (int d = 0; d < D; ++d) {
        const float kd = krow[d];
#pragma unroll
        for (int r = 0; r < kSimtRows; ++r) s[r] += q0[r * D + d] * kd;
      }
      const bool valid = k0 + lane < ke;
      float pr[kSimtRows];
#pragma unroll
      for (int r = 0; r < kSimtRows; ++r) {
        const float x = valid ? s[r] * p.scale_log2 : -INFINITY;
        const float mn = fmaxf(m[r], warp_max(x));
        const float ms = mn == -INFINITY ? 0.f : mn;
        const float alpha = exp2f(m[r] - ms);
        pr[r] = valid ? exp2f(x - ms) : 0.f;
        l[r] = l[r] * alpha + warp_sum(pr[r]);
        m[r] = mn;
#pragma unroll
        for (int i = 0; i < DV; ++i) o[r][i] *= alpha;
      }
      const int nvalid = ke - k0 < kSimtBN ? ke - k0 : kSimtBN;
      for (int j = 0; j < nvalid; ++j) {
        float pj[kSimtRows];
#pragma unroll
        for (int r = 0; r < kSimtRows; ++r) pj[r] = __shfl_sync(0xffffffffu, pr[r], j);
#pragma unroll
        for (int i = 0; i < DV; ++i) {
          const int d = lane + 32 * i;
          if (d < D) {
            const float vd = sV[j * D + d];
#pragma unroll
            for (int r = 0; r < kSimtRows; ++r) o[r][i] += pj[r] * vd;
          }
        }
      }
    }
  }

  T* ob = static_cast<T*>(a.out) + b * a.out_stride_b + h * a.out_stride_h;
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    const int qr = w.q0 + warp * kSimtRows + r;
    if (qr < w.q1) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
      for (int i = 0; i < DV; ++i) {
        const int d = lane + 32 * i;
        if (d < D) ob[static_cast<int64_t>(qr) * a.out_stride_l + d] = from_float<T>(o[r][i] * inv);
      }
      if (a.lse != nullptr && lane == 0) {
        a.lse[bh * a.q_len + qr] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Tensor-core path
// ---------------------------------------------------------------------------------------------------
constexpr int kMmaWarps = 4;
constexpr int kMmaBM = 16 * kMmaWarps;
constexpr int kMmaBN = 64;

inline size_t mma_smem_bytes(int d) { return 2u * static_cast<size_t>(kMmaBM + 4 * kMmaBN) * (d + 8); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 zero-fills the destination without reading (src stays valid anyway).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t lds32(const void* p) { return *static_cast<const uint32_t*>(p); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// D[16x8] += A[16x16] (row) * B[16x8] (col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices, transposed: register i of lane l holds rows 2(l%4), 2(l%4)+1, column l/4 of
// matrix i, whose 8 row addresses come from lanes 8i..8i+7.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
}

template <typename T, int D>
__global__ void __launch_bounds__(kMmaWarps * 32) attention_mma_kernel(const AttnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = kMmaBM, BN = kMmaBN, LDS = D + 8;  // +8 halves per row: conflict-free fragments
  constexpr int CH = D / 8;                              // 16-byte chunks per row
  constexpr int NT = kMmaWarps * 32;
  const anyflow_attention_args& a = p.args;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LDS]
  T* sK = sQ + BM * LDS;                   // [2][BN][LDS]
  T* sV = sK + 2 * BN * LDS;               // [2][BN][LDS]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
  const AttnWork w = attn_work(p.plan, static_cast<int32_t>(blockIdx.x));
  const int ntiles = count_tiles<BN>(w);

  const T* qb = static_cast<const T*>(a.q) + b * a.q_stride_b + h * a.q_stride_h;
  for (int c = tid; c < BM * CH; c += NT) {
    const int row = c / CH, col = (c % CH) * 8, qr = w.q0 + row;
    const bool ok = qr < w.q1;
    cp_async16(sQ + row * LDS + col, qb + static_cast<int64_t>(ok ? qr : w.q0) * a.q_stride_l + col, ok ? 16 : 0);
  }
  auto load_kv = [&](int stage, const Cursor& c) {
    const KV kv = kv_segment<T>(a, p.plan.segmented ? c.r : 0, b, h);
    const T* kp = reinterpret_cast<const T*>(kv.k);
    const T* vp = reinterpret_cast<const T*>(kv.v);
    const int32_t kend = range_end(w, c.r);
    T* dk = sK + stage * BN * LDS;
    T* dv = sV + stage * BN * LDS;
    for (int i = tid; i < BN * CH; i += NT) {
      const int row = i / CH, col = (i % CH) * 8;
      const int32_t key = c.k0 + row;
      const bool ok = key < kend;
      const int64_t src_row = ok ? key : c.k0;
      cp_async16(dk + row * LDS + col, kp + src_row * kv.k_sl + col, ok ? 16 : 0);
      cp_async16(dv + row * LDS + col, vp + src_row * kv.v_sl + col, ok ? 16 : 0);
    }
  };

  Cursor load_cur = first_tile<BN>(w);
  Cursor comp_cur = load_cur;
  if (ntiles > 0) {
    load_kv(0, load_cur);
    next_tile<BN>(w, load_cur);
  }
  cp_async_commit();

  float o[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows g and g + 8 of the warp
  uint32_t qf[D / 16][4];

  for (int it = 0; it < ntiles; ++it) {
    if (it + 1 < ntiles) {
      load_kv((it + 1) & 1, load_cur);
      next_tile<BN>(w, load_cur);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the tile just issued has landed
    __syncthreads();
    if (it == 0) {
      const T* q0 = sQ + (warp * 16 + g) * LDS + 2 * t4;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        qf[kk][0] = lds32(q0 + kk * 16);
        qf[kk][1] = lds32(q0 + 8 * LDS + kk * 16);
        qf[kk][2] = lds32(q0 + kk * 16 + 8);
        qf[kk][3] = lds32(q0 + 8 * LDS + kk * 16 + 8);
      }
    }
    const T* cK = sK + (it & 1) * BN * LDS;
    const T* cV = sV + (it & 1) * BN * LDS;

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      const T* k0p = cK + (j * 8 + g) * LDS + 2 * t4;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) mma16816<T>(s[j], qf[kk], lds32(k0p + kk * 16), lds32(k0p + kk * 16 + 8));
    }

    // Scale to base 2, mask the tail past the range end, online softmax.
    const int32_t kend = range_end(w, comp_cur.r);
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int32_t key = comp_cur.k0 + j * 8 + 2 * t4;
      s[j][0] = key < kend ? s[j][0] * p.scale_log2 : -INFINITY;
      s[j][1] = key + 1 < kend ? s[j][1] * p.scale_log2 : -INFINITY;
      s[j][2] = key < kend ? s[j][2] * p.scale_log2 : -INFINITY;
      s[j][3] = key + 1 < kend ? s[j][3] * p.scale_log2 : -INFINITY;
      mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
      mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float ms0 = mn0 == -INFINITY ? 0.f : mn0, ms1 = mn1 == -INFINITY ? 0.f : mn1;
    const float alpha0 = fast_exp2(m0 - ms0), alpha1 = fast_exp2(m1 - ms1);
    m0 = mn0;
    m1 = mn1;
    float ls0 = 0.f, ls1 = 0.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      s[j][0] = fast_exp2(s[j][0] - ms0);
      s[j][1] = fast_exp2(s[j][1] - ms0);
      s[j][2] = fast_exp2(s[j][2] - ms1);
      s[j][3] = fast_exp2(s[j][3] - ms1);
      ls0 += s[j][0] + s[j][1];
      ls1 += s[j][2] + s[j][3];
    }
    l0 = l0 * alpha0 + ls0;  // per-thread partial sums; the quad is reduced once at the end
    l1 = l1 * alpha1 + ls1;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      o[nd][0] *= alpha0;
      o[nd][1] *= alpha0;
      o[nd][2] *= alpha1;
      o[nd][3] *= alpha1;
    }

    // O += P V: the S accumulators of key blocks 2kk, 2kk+1 are the A fragment of keys 16kk..16kk+15.
    const int mat = lane >> 3, mrow = lane & 7;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const T* vrow = cV + (kk * 16 + (mat & 1) * 8 + mrow) * LDS + (mat >> 1) * 8;
#pragma unroll
      for (int ndp = 0; ndp < D / 16; ++ndp) {
        uint32_t b00, b01, b10, b11;
        ldmatrix_x4_trans(b00, b01, b10, b11, vrow + ndp * 16);
        mma16816<T>(o[2 * ndp], pa, b00, b01);
        mma16816<T>(o[2 * ndp + 1], pa, b10, b11);
      }
    }
    next_tile<BN>(w, comp_cur);
    __syncthreads();  // all warps are done with this stage before it is refilled
  }
  cp_async_wait<0>();

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const int r0 = w.q0 + warp * 16 + g, r1 = r0 + 8;
  T* ob = static_cast<T*>(a.out) + b * a.out_stride_b + h * a.out_stride_h;
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) {
    const int col = nd * 8 + 2 * t4;
    if (r0 < w.q1) {
      *reinterpret_cast<uint32_t*>(ob + static_cast<int64_t>(r0) * a.out_stride_l + col) =
          pack2<T>(o[nd][0] * inv0, o[nd][1] * inv0);
    }
    if (r1 < w.q1) {
      *reinterpret_cast<uint32_t*>(ob + static_cast<int64_t>(r1) * a.out_stride_l + col) =
          pack2<T>(o[nd][2] * inv1, o[nd][3] * inv1);
    }
  }
  if (a.lse != nullptr && t4 == 0) {
    if (r0 < w.q1) a.lse[bh * a.q_len + r0] = l0 > 0.f ? (m0 + log2f(l0)) * kLn2 : -INFINITY;
    if (r1 < w.q1) a.lse[bh * a.q_len + r1] = l1 > 0.f ? (m1 + log2f(l1)) * kLn2 : -INFINITY;
  }
#endif  // __CUDA_ARCH__ >= 800
}

// ---------------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------------
// Raises the dynamic shared memory limit of `kernel` once per device (a cheap call, but not free).
template <typename Kernel>
int ensure_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& done) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return ANYFLOW_SUCCESS;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return static_cast<int>(err);
  done.fetch_or(bit, std::memory_order_relaxed);
  return ANYFLOW_SUCCESS;
}

template <typename T, int DMAX>
int launch_simt(const AttnParams& p, cudaStream_t stream) {
  static std::atomic<uint64_t> done{0};
  const size_t smem = simt_smem_bytes(DMAX);  // the attribute covers every head_dim of this instantiation
  int rc = ensure_smem(attention_simt_kernel<T, DMAX>, smem, done);
  if (rc != ANYFLOW_SUCCESS) return rc;
  const dim3 grid(static_cast<unsigned>(p.plan.num_tiles), static_cast<unsigned>(p.args.batch * p.args.heads));
  attention_simt_kernel<T, DMAX><<<grid, kSimtWarps * 32, simt_smem_bytes(p.args.head_dim), stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int D>
int launch_mma(const AttnParams& p, cudaStream_t stream) {
  static std::atomic<uint64_t> done{0};
  const size_t smem = mma_smem_bytes(D);
  int rc = ensure_smem(attention_mma_kernel<T, D>, smem, done);
  if (rc != ANYFLOW_SUCCESS) return rc;
  const dim3 grid(static_cast<unsigned>(p.plan.num_tiles), static_cast<unsigned>(p.args.batch * p.args.heads));
  attention_mma_kernel<T, D><<<grid, kMmaWarps * 32, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_simt_dim(const AttnParams& p, cudaStream_t stream) {
  if (p.args.head_dim <= 64) return launch_simt<T, 64>(p, stream);
  if (p.args.head_dim <= 128) return launch_simt<T, 128>(p, stream);
  return launch_simt<T, 256>(p, stream);
}

// Whether the tensor-core path can take these arguments (device capability aside).
bool mma_applies(const anyflow_attention_args& a) {
  if (a.dtype == ANYFLOW_DTYPE_F32 || (a.head_dim != 64 && a.head_dim != 128)) return false;
  const int e = 2;
  bool ok = anyflow_aligned(a.q, 16) && anyflow_aligned(a.out, 16) && anyflow_stride_aligned(a.q_stride_b, e, 16) &&
            anyflow_stride_aligned(a.q_stride_h, e, 16) && anyflow_stride_aligned(a.q_stride_l, e, 16) &&
            anyflow_stride_aligned(a.out_stride_b, e, 16) && anyflow_stride_aligned(a.out_stride_h, e, 16) &&
            anyflow_stride_aligned(a.out_stride_l, e, 16);
  for (int s = 0; s < a.num_segments; ++s) {
    const anyflow_kv_segment& g = a.segments[s];
    if (g.len == 0) continue;
    ok = ok && anyflow_aligned(g.k, 16) && anyflow_aligned(g.v, 16) && anyflow_stride_aligned(g.k_stride_b, e, 16) &&
         anyflow_stride_aligned(g.k_stride_h, e, 16) && anyflow_stride_aligned(g.k_stride_l, e, 16) &&
         anyflow_stride_aligned(g.v_stride_b, e, 16) && anyflow_stride_aligned(g.v_stride_h, e, 16) &&
         anyflow_stride_aligned(g.v_stride_l, e, 16);
  }
  return ok;
}

int device_major() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return 0;
  return major;
}

template <typename T>
int launch_mma_dim(const AttnParams& p, cudaStream_t stream) {
  if (p.args.head_dim == 64) return launch_mma<T, 64>(p, stream);
  return launch_mma<T, 128>(p, stream);
}

// Builds the plan for the chosen path and launches it (`causal`: from `layout`, else segmented).
int run(const anyflow_attention_args* args, bool causal, const int64_t* layout, int64_t layout_len,
        cudaStream_t stream) {
  int rc = anyflow_attention_check(args);
  if (rc != ANYFLOW_SUCCESS) return rc;
  const anyflow_attention_args& a = *args;
  if (causal && a.num_segments != 1) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  bool use_mma = a.impl != ANYFLOW_ATTN_SIMT && mma_applies(a);
  if (a.impl == ANYFLOW_ATTN_MMA && !use_mma) return ANYFLOW_ERROR_UNSUPPORTED;
  AttnParams p;
  const int block_m = use_mma ? kMmaBM : kSimtBM;
  rc = causal ? anyflow_attn_plan_layout(&p.plan, layout, layout_len, a.q_len, a.segments[0].len, block_m)
                         : anyflow_attn_plan_segmented(&p.plan, &a, block_m);
  if (rc != ANYFLOW_SUCCESS) return rc;
  if (a.batch * a.heads * a.q_len == 0 || p.plan.num_tiles == 0) return ANYFLOW_SUCCESS;
  if (use_mma && device_major() < 8) {  // checked after the host-side validation: it touches the device
    if (a.impl == ANYFLOW_ATTN_MMA) return ANYFLOW_ERROR_UNSUPPORTED;
    use_mma = false;
    rc = causal ? anyflow_attn_plan_layout(&p.plan, layout, layout_len, a.q_len, a.segments[0].len, kSimtBM)
                           : anyflow_attn_plan_segmented(&p.plan, &a, kSimtBM);
    if (rc != ANYFLOW_SUCCESS) return rc;
  }
  p.args = a;
  p.scale_log2 = a.scale * kLog2e;
  if (use_mma) {
    return a.dtype == ANYFLOW_DTYPE_BF16 ? launch_mma_dim<__nv_bfloat16>(p, stream) : launch_mma_dim<__half>(p, stream);
  }
  switch (a.dtype) {
    case ANYFLOW_DTYPE_F32:
      return launch_simt_dim<float>(p, stream);
    case ANYFLOW_DTYPE_BF16:
      return launch_simt_dim<__nv_bfloat16>(p, stream);
    case ANYFLOW_DTYPE_F16:
      return launch_simt_dim<__half>(p, stream);
  }
  return ANYFLOW_ERROR_INVALID_ARGUMENT;
}

}  // namespace
}  // namespace anyflow

extern "C" int anyflow_segmented_attention(const anyflow_attention_args* args, void* stream) {
  return anyflow::run(args, false, nullptr, 0, static_cast<cudaStream_t>(stream));
}

extern "C" int anyflow_chunk_causal_attention(const anyflow_attention_args* args, const int64_t* layout,
                                              int64_t layout_len, void* stream) {
  return anyflow::run(args, true, layout, layout_len, static_cast<cudaStream_t>(stream));
}
