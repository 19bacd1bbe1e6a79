// C API of the torch-free CUDA kernels in csrc/kernels (usable from C, C++ and the torch bindings).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Return codes of the launchers: 0 on success, ANYFLOW_ERROR_INVALID_ARGUMENT for bad arguments
// (checked on the host before touching the device), otherwise the cudaError_t of the failed launch.
#define ANYFLOW_SUCCESS 0
#define ANYFLOW_ERROR_INVALID_ARGUMENT -1

// Element type of the mean velocity u.
typedef enum { ANYFLOW_DTYPE_F32 = 0, ANYFLOW_DTYPE_BF16 = 1 } anyflow_dtype;

// Flow-map Euler shortcut step with a per-frame step size: z_r = z_t - dt[b, f] * u.
//
// The contiguous latents are viewed as [batch, outer, frames, inner]: for diffusers' Wan layout
// [B, C, F, H, W] that is outer = C, inner = H * W; for [B, F, C, H, W] it is outer = 1, inner = C*H*W.
// dt = t - r (sigma units) is a contiguous fp32 [batch, frames] array. z_r may alias z_t.
//
// Args:
//   z_r: fp32 output, batch * outer * frames * inner elements (device memory).
//   z_t: fp32 input latents, same shape.
//   u: mean velocity, same shape, fp32 or bf16 (u_dtype).
//   dt: fp32 [batch, frames] step sizes.
//   stream: a cudaStream_t, or NULL for the default stream.
// Returns: ANYFLOW_SUCCESS, ANYFLOW_ERROR_INVALID_ARGUMENT, or a cudaError_t value.
int anyflow_euler_shortcut_f32(float* z_r, const float* z_t, const void* u, anyflow_dtype u_dtype,
                               const float* dt, int64_t batch, int64_t outer, int64_t frames, int64_t inner,
                               void* stream);

// Human-readable message for a launcher return code.
const char* anyflow_error_string(int code);

#ifdef __cplusplus
}
#endif
