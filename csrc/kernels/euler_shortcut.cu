// Flow-map Euler shortcut step z_r = z_t - dt[b, f] * u with per-frame dt (see euler_shortcut.h).
#include <cuda_runtime.h>

#include "common.cuh"
#include "euler_shortcut.h"

namespace anyflow {
namespace {

constexpr int kThreads = 256;

template <typename U>
__global__ void euler_shortcut_kernel(float* __restrict__ z_r, const float* __restrict__ z_t,
                                      const U* __restrict__ u, const float* __restrict__ dt, int64_t n,
                                      int64_t outer, int64_t frames, int64_t inner) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    z_r[i] = z_t[i] - dt[frame_slot(i, outer, frames, inner)] * to_float(u[i]);
  }
}

template <typename U>
int launch(float* z_r, const float* z_t, const U* u, const float* dt, int64_t n, int64_t outer, int64_t frames,
           int64_t inner, cudaStream_t stream) {
  // A grid-stride loop: cap the grid so huge tensors do not overflow gridDim.x.
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  euler_shortcut_kernel<U><<<grid, kThreads, 0, stream>>>(z_r, z_t, u, dt, n, outer, frames, inner);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace anyflow

extern "C" int anyflow_euler_shortcut_f32(float* z_r, const float* z_t, const void* u, anyflow_dtype u_dtype,
                                          const float* dt, int64_t batch, int64_t outer, int64_t frames,
                                          int64_t inner, void* stream) {
  if (batch < 0 || outer < 0 || frames < 0 || inner < 0) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  const int64_t n = batch * outer * frames * inner;
  if (n == 0) return ANYFLOW_SUCCESS;
  if (z_r == nullptr || z_t == nullptr || u == nullptr || dt == nullptr) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  auto s = static_cast<cudaStream_t>(stream);
  switch (u_dtype) {
    case ANYFLOW_DTYPE_F32:
      return anyflow::launch(z_r, z_t, static_cast<const float*>(u), dt, n, outer, frames, inner, s);
    case ANYFLOW_DTYPE_BF16:
      return anyflow::launch(z_r, z_t, static_cast<const __nv_bfloat16*>(u), dt, n, outer, frames, inner, s);
  }
  return ANYFLOW_ERROR_INVALID_ARGUMENT;
}

extern "C" const char* anyflow_error_string(int code) {
  if (code == ANYFLOW_SUCCESS) return "success";
  if (code == ANYFLOW_ERROR_INVALID_ARGUMENT) return "invalid argument (negative size, null pointer or unknown dtype)";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
