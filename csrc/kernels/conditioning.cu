// Per-frame adaLN modulate / gated residual / residual + LayerNorm in one row kernel (see conditioning.h).
//
// One thread block per token row. Each thread keeps up to kChunks vectors of VEC elements of x_new in
// registers, so x and y are read once and each output written once; the LayerNorm statistics are two
// block reductions (mean, then the centred sum of squares: exact two-pass variance, like torch). The
// frame row of the token comes from the segment table; the per-frame rows ([dim] each) are small and
// stay in L1/L2, read with a runtime dtype.
#include <cuda_runtime.h>

#include "common.cuh"
#include "conditioning.h"

namespace anyflow {
namespace {

constexpr int kChunks = 4;         // vectors per thread
constexpr int kMaxThreads = 1024;  // threads per row

template <typename T, int VEC, bool ALIGNED>
__global__ void __launch_bounds__(kMaxThreads, 1) residual_norm_kernel(const anyflow_residual_norm_args a) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const int64_t b = row / a.tokens, n = row % a.tokens;
  const int64_t chunks = a.dim / VEC;
  const bool per_frame = a.gate != nullptr || a.norm == ANYFLOW_NORM_MODULATE;
  const int64_t f = per_frame ? segment_row(a.segments, n) : 0;

  const T* xp = static_cast<const T*>(a.x) + b * a.x_stride_b + n * a.x_stride_n;
  const T* yp = a.y != nullptr ? static_cast<const T*>(a.y) + b * a.y_stride_b + n * a.y_stride_n : nullptr;
  const int64_t out_off = row * a.dim;

  float v[kChunks][VEC];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (c < chunks) {
      load_vec<T, VEC, ALIGNED>(xp + c * VEC, v[k]);
      if (yp != nullptr) {
        float yv[VEC];
        load_vec<T, VEC, ALIGNED>(yp + c * VEC, yv);
        if (a.gate != nullptr) {
          const int64_t g0 = b * a.gate_stride_b + f * a.gate_stride_r + c * VEC;
#pragma unroll
          for (int i = 0; i < VEC; ++i) v[k][i] = v[k][i] + yv[i] * load_as_float(a.gate, a.gate_dtype, g0 + i);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) v[k][i] = v[k][i] + yv[i];
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[k][i] = round_to<T>(v[k][i]);
        if (a.x_out != nullptr) store_vec<T, VEC, ALIGNED>(static_cast<T*>(a.x_out) + out_off + c * VEC, v[k]);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += v[k][i];
    }
  }
  if (a.norm == ANYFLOW_NORM_NONE) return;

  const float inv_dim = 1.f / static_cast<float>(a.dim);
  const float mean = block_sum(sum, scratch) * inv_dim;
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (c < chunks) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = v[k][i] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) * inv_dim + a.eps);

  T* hp = static_cast<T*>(a.h_out) + out_off;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (c < chunks) {
      float h[VEC];
      const int64_t d0 = c * VEC;
      if (a.norm == ANYFLOW_NORM_MODULATE) {
        const int64_t s0 = b * a.shift_stride_b + f * a.shift_stride_r + d0;
        const int64_t c0 = b * a.scale_stride_b + f * a.scale_stride_r + d0;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float normed = (v[k][i] - mean) * rstd;
          h[i] = normed * (1.f + load_as_float(a.scale, a.scale_dtype, c0 + i)) +
                 load_as_float(a.shift, a.shift_dtype, s0 + i);
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          float x = (v[k][i] - mean) * rstd;
          if (a.weight != nullptr) x = x * load_as_float(a.weight, a.weight_dtype, d0 + i);
          if (a.bias != nullptr) x = x + load_as_float(a.bias, a.bias_dtype, d0 + i);
          h[i] = x;
        }
      }
      store_vec<T, VEC, ALIGNED>(hp + d0, h);
    }
  }
}

template <typename T>
int launch(const anyflow_residual_norm_args& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int e = sizeof(T);
  bool vec = a.dim % kVec == 0 && anyflow_aligned(a.x, 16) && anyflow_stride_aligned(a.x_stride_b, e, 16) &&
             anyflow_stride_aligned(a.x_stride_n, e, 16);
  if (a.y != nullptr) {
    vec = vec && anyflow_aligned(a.y, 16) && anyflow_stride_aligned(a.y_stride_b, e, 16) &&
          anyflow_stride_aligned(a.y_stride_n, e, 16);
  }
  vec = vec && (a.x_out == nullptr || anyflow_aligned(a.x_out, 16)) && (a.h_out == nullptr || anyflow_aligned(a.h_out, 16));
  // Unaligned rows whose width is a multiple of kVec keep kVec-element chunks (scalar accesses), so
  // they fit one block exactly when aligned rows do (the limit anyflow/ops/_cuda.py checks); only
  // other widths take 1-element chunks (at most kChunks * kMaxThreads elements).
  const bool whole = a.dim % kVec == 0;
  const int64_t chunks = whole ? a.dim / kVec : a.dim;
  const int64_t rows = a.batch * a.tokens;
  int threads = 0;
  if (!row_launch(chunks, kChunks, kMaxThreads, rows, &threads)) return ANYFLOW_ERROR_UNSUPPORTED;
  if (vec) {
    residual_norm_kernel<T, kVec, true><<<static_cast<unsigned>(rows), threads, 0, stream>>>(a);
  } else if (whole) {
    residual_norm_kernel<T, kVec, false><<<static_cast<unsigned>(rows), threads, 0, stream>>>(a);
  } else {
    residual_norm_kernel<T, 1, false><<<static_cast<unsigned>(rows), threads, 0, stream>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace anyflow

extern "C" int anyflow_residual_norm(const anyflow_residual_norm_args* args, void* stream) {
  const int rc = anyflow_residual_norm_check(args);
  if (rc != ANYFLOW_SUCCESS) return rc;
  if (args->batch * args->tokens == 0) return ANYFLOW_SUCCESS;
  auto s = static_cast<cudaStream_t>(stream);
  switch (args->dtype) {
    case ANYFLOW_DTYPE_F32:
      return anyflow::launch<float>(*args, s);
    case ANYFLOW_DTYPE_BF16:
      return anyflow::launch<__nv_bfloat16>(*args, s);
    case ANYFLOW_DTYPE_F16:
      return anyflow::launch<__half>(*args, s);
  }
  return ANYFLOW_ERROR_INVALID_ARGUMENT;
}
