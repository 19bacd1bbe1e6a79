// C API of the flow-map Euler shortcut kernel (anyflow.ops.euler_shortcut).
//
//   u   = velocity[b]                                              (velocity batch == batch)
//   u   = velocity[b] + g * (velocity[batch + b] - velocity[b])   (cfg: velocity batch == 2 * batch,
//                                                                  stacked [uncond; cond])
//   z_r = z_t - dt[b, f] * u                                      (fp32 math, rounded to out_dtype)
//   z_r = z_t                                                      for frames f < num_context_frames
//
// The contiguous latents are viewed as [batch, outer, frames, inner]: for anyflow's [B, F, C, H, W] that
// is outer = 1, inner = C * H * W; for diffusers' Wan layout [B, C, F, H, W] outer = C, inner = H * W.
// dt = (t - r) / 1000 is a contiguous fp32 [batch, frames] array. out may alias latents.
#pragma once

#include <stdint.h>

#include "api.h"

typedef struct {
  void* out;  // dtype latents_dtype, batch * outer * frames * inner elements
  const void* latents;
  anyflow_dtype latents_dtype;
  const void* velocity;  // batch (or 2 * batch with cfg) * outer * frames * inner elements
  anyflow_dtype velocity_dtype;
  const float* dt;  // [batch, frames]
  int64_t batch, outer, frames, inner;
  int32_t cfg;  // 1: velocity is [uncond; cond] and is combined with guidance_scale
  float guidance_scale;
  int64_t num_context_frames;
} anyflow_euler_args;

#ifdef __cplusplus
extern "C" {
#endif

int anyflow_euler_shortcut(const anyflow_euler_args* args, void* stream);

#ifdef __cplusplus
}  // extern "C"

static inline int anyflow_euler_check(const anyflow_euler_args* a) {
  if (a == nullptr || !anyflow_dtype_valid(a->latents_dtype) || !anyflow_dtype_valid(a->velocity_dtype)) {
    return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  if (a->batch < 0 || a->outer < 0 || a->frames < 0 || a->inner < 0 || (a->cfg != 0 && a->cfg != 1)) {
    return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  if (a->num_context_frames < 0 || a->num_context_frames > a->frames) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (a->batch * a->outer * a->frames * a->inner == 0) return ANYFLOW_SUCCESS;
  if (a->out == nullptr || a->latents == nullptr || a->velocity == nullptr || a->dt == nullptr) {
    return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  return ANYFLOW_SUCCESS;
}
#endif
