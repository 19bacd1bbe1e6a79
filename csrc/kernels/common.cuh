// Helpers shared by the torch-free CUDA kernels. Plain CUDA C++ (no torch headers); the index math
// also compiles as host C++ so that unit tests can check it without a GPU.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#define ANYFLOW_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ANYFLOW_HOST_DEVICE inline
#endif

namespace anyflow {

// Index into a [batch, frames] per-frame array for flat element i of a [batch, outer, frames, inner] tensor.
ANYFLOW_HOST_DEVICE int64_t frame_slot(int64_t i, int64_t outer, int64_t frames, int64_t inner) {
  const int64_t f = (i / inner) % frames;
  const int64_t b = i / (outer * frames * inner);
  return b * frames + f;
}

#ifdef __CUDACC__
// Explicit conversions: torch's nvcc flags disable the implicit bf16 <-> float operators.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
#endif

}  // namespace anyflow
