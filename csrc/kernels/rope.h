// C API of the rotary-embedding kernels (anyflow.ops.apply_rope / qk_norm_rope).
//
// Interleaved pairs: channel pair (2j, 2j+1) of a head is the complex number x_2j + i x_2j+1 and is
// rotated by the angle of table column j of its token: out_2j = x_2j c - x_2j+1 s,
// out_2j+1 = x_2j s + x_2j+1 c, with fp32 cos/sin tables [tokens, head_dim / 2] (contiguous).
//
// apply_rope:   x is [batch, tokens, heads, head_dim] with unit stride along head_dim and any other
//               strides; out is contiguous [batch, tokens, heads, head_dim].
// qk_norm_rope: x is [batch, tokens, heads * head_dim] (x_stride_h must be head_dim); first an RMSNorm
//               over all heads * head_dim channels of a token, x * rsqrt(mean(x^2) + eps) * weight
//               (weight contiguous [heads * head_dim], any float dtype), then the rotation. fp32 math,
//               one rounding at the end.
#pragma once

#include <stdint.h>

#include "api.h"

typedef struct {
  anyflow_dtype dtype;  // of x and out
  int64_t batch, tokens, heads, head_dim;
  const void* x;
  int64_t x_stride_b, x_stride_l, x_stride_h;
  const float* cos;
  const float* sin;
  void* out;
  const void* weight;  // qk_norm_rope only
  anyflow_dtype weight_dtype;
  float eps;
} anyflow_rope_args;

#ifdef __cplusplus
extern "C" {
#endif

int anyflow_apply_rope(const anyflow_rope_args* args, void* stream);
// ANYFLOW_ERROR_UNSUPPORTED when heads * head_dim is too wide for one block (see conditioning.h).
int anyflow_qk_norm_rope(const anyflow_rope_args* args, void* stream);

#ifdef __cplusplus
}  // extern "C"

// Host-side validation; `norm` selects the qk_norm_rope requirements.
static inline int anyflow_rope_check(const anyflow_rope_args* a, bool norm) {
  if (a == nullptr || !anyflow_dtype_valid(a->dtype)) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (a->batch < 0 || a->tokens < 0 || a->heads < 0 || a->head_dim < 0) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (a->head_dim % 2 != 0) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (norm && (!anyflow_dtype_valid(a->weight_dtype) || a->x_stride_h != a->head_dim || !(a->eps >= 0.f))) {
    return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  if (a->batch * a->tokens * a->heads * a->head_dim == 0) return ANYFLOW_SUCCESS;
  if (a->x == nullptr || a->cos == nullptr || a->sin == nullptr || a->out == nullptr) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (norm && a->weight == nullptr) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  return ANYFLOW_SUCCESS;
}
#endif
