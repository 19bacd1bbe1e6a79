// Helpers shared by the torch-free CUDA kernels. Plain CUDA C++ (no torch headers); the index math
// also compiles as host C++ so that the CPU twins and the unit tests use exactly the same code.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ANYFLOW_HOST_DEVICE __host__ __device__ __forceinline__
#define ANYFLOW_UNROLL _Pragma("unroll")
#else
#define ANYFLOW_HOST_DEVICE inline
#define ANYFLOW_UNROLL
#endif

namespace anyflow {

// Index into a [batch, frames] per-frame array for flat element i of a [batch, outer, frames, inner] tensor.
ANYFLOW_HOST_DEVICE int64_t frame_slot(int64_t i, int64_t outer, int64_t frames, int64_t inner) {
  const int64_t f = (i / inner) % frames;
  const int64_t b = i / (outer * frames * inner);
  return b * frames + f;
}

ANYFLOW_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Launch geometry of the one-block-per-row kernels: a row of `chunks` vectors, at most `per_thread` per
// thread and `max_threads` threads, over `rows` rows. Returns false when a row or the grid is too large.
inline bool row_launch(int64_t chunks, int per_thread, int max_threads, int64_t rows, int* threads) {
  if (chunks > static_cast<int64_t>(per_thread) * max_threads || rows > 0x7fffffffLL) return false;
  const int t = static_cast<int>(ceil_div(ceil_div(chunks, per_thread), 32) * 32);
  *threads = t < 32 ? 32 : t;
  return true;
}

#ifdef __CUDACC__
// Explicit conversions: torch's nvcc flags (-D__CUDA_NO_BFLOAT16_CONVERSIONS__, -D__CUDA_NO_HALF_OPERATORS__
// ...) disable the implicit bf16/half <-> float operators, and the standalone build must agree.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// x rounded to T and back: the value a tensor of dtype T stores.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// A scalar of runtime dtype (0 fp32, 1 bf16, 2 fp16: anyflow_dtype) read as float. The branch is uniform.
__device__ __forceinline__ float load_as_float(const void* p, int dtype, int64_t i) {
  if (dtype == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dtype == 2) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// VEC consecutive elements as floats; one 16-byte access when VEC * sizeof(T) == 16 and ALIGNED.
template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (ALIGNED && VEC * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(p[i]);
  }
}

template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[VEC]) {
  if constexpr (ALIGNED && VEC * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_float<T>(v[i]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` is __shared__ float[33]; consecutive calls may reuse it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers of scratch[32] are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float r = lane < warps ? scratch[lane] : 0.f;
    r = warp_sum(r);
    if (lane == 0) scratch[32] = r;
  }
  __syncthreads();
  return scratch[32];
}
#endif  // __CUDACC__

}  // namespace anyflow
