// Rotary embedding kernels (see rope.h): apply_rope (elementwise over vectors of pairs) and
// qk_norm_rope (one block per token: RMSNorm over all heads, then the rotation, one read and one write).
#include <cuda_runtime.h>

#include "common.cuh"
#include "rope.h"

namespace anyflow {
namespace {

constexpr int kChunks = 4;
constexpr int kMaxThreads = 1024;

// Rotates the VEC / 2 pairs of v in place; the first pair is table column j0.
template <int VEC>
__device__ __forceinline__ void rotate(float (&v)[VEC], const float* cos_row, const float* sin_row, int64_t j0) {
#pragma unroll
  for (int p = 0; p < VEC / 2; ++p) {
    const float c = cos_row[j0 + p], s = sin_row[j0 + p];
    const float re = v[2 * p], im = v[2 * p + 1];
    v[2 * p] = re * c - im * s;
    v[2 * p + 1] = re * s + im * c;
  }
}

template <typename T, int VEC, bool ALIGNED>
__global__ void apply_rope_kernel(const anyflow_rope_args a, int64_t total_chunks) {
  const int64_t per_head = a.head_dim / VEC;
  const int64_t half = a.head_dim / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total_chunks; i += stride) {
    const int64_t d0 = (i % per_head) * VEC;
    int64_t rest = i / per_head;
    const int64_t h = rest % a.heads;
    rest /= a.heads;
    const int64_t l = rest % a.tokens;
    const int64_t b = rest / a.tokens;
    float v[VEC];
    load_vec<T, VEC, ALIGNED>(static_cast<const T*>(a.x) + b * a.x_stride_b + l * a.x_stride_l + h * a.x_stride_h + d0, v);
    rotate<VEC>(v, a.cos + l * half, a.sin + l * half, d0 / 2);
    store_vec<T, VEC, ALIGNED>(static_cast<T*>(a.out) + i * VEC, v);
  }
}

template <typename T, int VEC, bool ALIGNED>
__global__ void __launch_bounds__(kMaxThreads, 1) qk_norm_rope_kernel(const anyflow_rope_args a) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;  // b * tokens + l
  const int64_t b = row / a.tokens, l = row % a.tokens;
  const int64_t channels = a.heads * a.head_dim;
  const int64_t chunks = channels / VEC;
  const int64_t half = a.head_dim / 2;
  const T* xp = static_cast<const T*>(a.x) + b * a.x_stride_b + l * a.x_stride_l;

  float v[kChunks][VEC];
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (c < chunks) {
      load_vec<T, VEC, ALIGNED>(xp + c * VEC, v[k]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sq += v[k][i] * v[k][i];
    }
  }
  const float r = rsqrtf(block_sum(sq, scratch) / static_cast<float>(channels) + a.eps);
  T* op = static_cast<T*>(a.out) + row * channels;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (c < chunks) {
      const int64_t ch0 = c * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = v[k][i] * r * load_as_float(a.weight, a.weight_dtype, ch0 + i);
      // VEC divides head_dim, so the vector lies in one head.
      rotate<VEC>(v[k], a.cos + l * half, a.sin + l * half, (ch0 % a.head_dim) / 2);
      store_vec<T, VEC, ALIGNED>(op + ch0, v[k]);
    }
  }
}

template <typename T>
bool aligned_rows(const anyflow_rope_args& a, int vec) {
  const int e = sizeof(T);
  return a.head_dim % vec == 0 && anyflow_aligned(a.x, 16) && anyflow_aligned(a.out, 16) &&
         anyflow_stride_aligned(a.x_stride_b, e, 16) && anyflow_stride_aligned(a.x_stride_l, e, 16) &&
         anyflow_stride_aligned(a.x_stride_h, e, 16);
}

template <typename T>
int launch_apply(const anyflow_rope_args& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int threads = 256;
  if (aligned_rows<T>(a, kVec)) {
    const int64_t total = a.batch * a.tokens * a.heads * (a.head_dim / kVec);
    const int64_t blocks = ceil_div(total, threads);
    apply_rope_kernel<T, kVec, true>
        <<<static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16), threads, 0, stream>>>(a, total);
  } else {
    const int64_t total = a.batch * a.tokens * a.heads * (a.head_dim / 2);
    const int64_t blocks = ceil_div(total, threads);
    apply_rope_kernel<T, 2, false>
        <<<static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16), threads, 0, stream>>>(a, total);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_qk(const anyflow_rope_args& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = aligned_rows<T>(a, kVec);
  // Unaligned rows keep kVec-element chunks (scalar accesses) when kVec divides head_dim, so they fit
  // one block exactly when aligned rows do (the limit anyflow/ops/_cuda.py checks); other head dims
  // take pairs (at most 2 * kChunks * kMaxThreads channels).
  const bool whole = a.head_dim % kVec == 0;
  const int64_t chunks = a.heads * a.head_dim / (whole ? kVec : 2);
  const int64_t rows = a.batch * a.tokens;
  int threads = 0;
  if (!row_launch(chunks, kChunks, kMaxThreads, rows, &threads)) return ANYFLOW_ERROR_UNSUPPORTED;
  if (vec) {
    qk_norm_rope_kernel<T, kVec, true><<<static_cast<unsigned>(rows), threads, 0, stream>>>(a);
  } else if (whole) {
    qk_norm_rope_kernel<T, kVec, false><<<static_cast<unsigned>(rows), threads, 0, stream>>>(a);
  } else {
    qk_norm_rope_kernel<T, 2, false><<<static_cast<unsigned>(rows), threads, 0, stream>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace anyflow

extern "C" int anyflow_apply_rope(const anyflow_rope_args* args, void* stream) {
  const int rc = anyflow_rope_check(args, false);
  if (rc != ANYFLOW_SUCCESS) return rc;
  if (args->batch * args->tokens * args->heads * args->head_dim == 0) return ANYFLOW_SUCCESS;
  auto s = static_cast<cudaStream_t>(stream);
  switch (args->dtype) {
    case ANYFLOW_DTYPE_F32:
      return anyflow::launch_apply<float>(*args, s);
    case ANYFLOW_DTYPE_BF16:
      return anyflow::launch_apply<__nv_bfloat16>(*args, s);
    case ANYFLOW_DTYPE_F16:
      return anyflow::launch_apply<__half>(*args, s);
  }
  return ANYFLOW_ERROR_INVALID_ARGUMENT;
}

extern "C" int anyflow_qk_norm_rope(const anyflow_rope_args* args, void* stream) {
  const int rc = anyflow_rope_check(args, true);
  if (rc != ANYFLOW_SUCCESS) return rc;
  if (args->batch * args->tokens * args->heads * args->head_dim == 0) return ANYFLOW_SUCCESS;
  auto s = static_cast<cudaStream_t>(stream);
  switch (args->dtype) {
    case ANYFLOW_DTYPE_F32:
      return anyflow::launch_qk<float>(*args, s);
    case ANYFLOW_DTYPE_BF16:
      return anyflow::launch_qk<__nv_bfloat16>(*args, s);
    case ANYFLOW_DTYPE_F16:
      return anyflow::launch_qk<__half>(*args, s);
  }
  return ANYFLOW_ERROR_INVALID_ARGUMENT;
}
