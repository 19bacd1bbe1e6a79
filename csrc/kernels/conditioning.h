// C API of the per-frame conditioning kernels: adaLN modulate, gated residual, residual + LayerNorm.
//
// One launcher covers the three ops (anyflow.ops.adaln_modulate / gated_residual / residual_norm):
//
//   x_new = x + y * gate[b, f(n)]      (gate == NULL: x + y; y == NULL: x_new = x), math in fp32,
//                                       rounded to `dtype` (the value a dtype tensor stores)
//   h     = LN(x_new) (biased variance, eps inside the rsqrt, fp32), then
//           MODULATE: h * (1 + scale[b, f(n)]) + shift[b, f(n)]
//           AFFINE:   h * weight + bias (either may be NULL)
//           NONE:     h is not computed
//
// f(n) is the frame row of token n from the segment table. Activations are [batch, tokens, dim] with
// unit stride along dim and any batch/token strides; per-frame tensors are [batch, rows, dim], also
// with unit stride along dim; weight/bias are contiguous [dim]. Outputs are contiguous.
#pragma once

#include <stdint.h>

#include "api.h"
#include "segments.h"

typedef enum { ANYFLOW_NORM_NONE = 0, ANYFLOW_NORM_MODULATE = 1, ANYFLOW_NORM_AFFINE = 2 } anyflow_norm_mode;

typedef struct {
  anyflow_dtype dtype;  // of x, y, x_out, h_out
  int64_t batch, tokens, dim;
  const void* x;
  int64_t x_stride_b, x_stride_n;
  const void* y;  // NULL: no residual (adaln_modulate)
  int64_t y_stride_b, y_stride_n;
  const void* gate;  // NULL: x + y
  anyflow_dtype gate_dtype;
  int64_t gate_stride_b, gate_stride_r;
  anyflow_norm_mode norm;
  const void* shift;  // MODULATE only
  const void* scale;
  anyflow_dtype shift_dtype, scale_dtype;
  int64_t shift_stride_b, shift_stride_r, scale_stride_b, scale_stride_r;
  const void* weight;  // AFFINE only, optional
  const void* bias;    // AFFINE only, optional
  anyflow_dtype weight_dtype, bias_dtype;
  float eps;
  anyflow_segment_table segments;  // used when gate or MODULATE is given
  void* x_out;                     // x_new, or NULL when not wanted (needs y)
  void* h_out;                     // h, NULL iff norm == NONE
} anyflow_residual_norm_args;

#ifdef __cplusplus
extern "C" {
#endif

// Launch on `stream` (a cudaStream_t, NULL = default stream). ANYFLOW_ERROR_UNSUPPORTED when a row is
// too wide for one thread block: more than 4096 chunks of 16 bytes' worth of elements (aligned or not),
// or more than 4096 elements when dim is not a multiple of such a chunk. (qk_norm_rope, rope.h: the
// same with head_dim deciding the chunk, and 8192 channels in the second case.)
int anyflow_residual_norm(const anyflow_residual_norm_args* args, void* stream);

#ifdef __cplusplus
}  // extern "C"

// Host-side validation shared by the launcher, the CPU twins and the unit tests.
static inline int anyflow_residual_norm_check(const anyflow_residual_norm_args* a) {
  if (a == nullptr) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (!anyflow_dtype_valid(a->dtype) || a->batch < 0 || a->tokens < 0 || a->dim < 0) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (a->norm != ANYFLOW_NORM_NONE && a->norm != ANYFLOW_NORM_MODULATE && a->norm != ANYFLOW_NORM_AFFINE) {
    return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  if ((a->norm == ANYFLOW_NORM_NONE) != (a->h_out == nullptr)) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (a->x_out != nullptr && a->y == nullptr) return ANYFLOW_ERROR_INVALID_ARGUMENT;  // x_new would be x
  if (a->x_out == nullptr && a->h_out == nullptr) return ANYFLOW_ERROR_INVALID_ARGUMENT;  // nothing to do
  if (a->gate != nullptr && (a->y == nullptr || !anyflow_dtype_valid(a->gate_dtype))) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (a->norm == ANYFLOW_NORM_MODULATE &&
      (a->shift == nullptr || a->scale == nullptr || !anyflow_dtype_valid(a->shift_dtype) ||
       !anyflow_dtype_valid(a->scale_dtype))) {
    return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  if (a->norm != ANYFLOW_NORM_MODULATE && (a->shift != nullptr || a->scale != nullptr)) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (a->norm != ANYFLOW_NORM_AFFINE && (a->weight != nullptr || a->bias != nullptr)) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if ((a->weight != nullptr && !anyflow_dtype_valid(a->weight_dtype)) ||
      (a->bias != nullptr && !anyflow_dtype_valid(a->bias_dtype))) {
    return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  if ((a->gate != nullptr || a->norm == ANYFLOW_NORM_MODULATE) &&
      (a->segments.num_tokens != a->tokens || a->segments.count < 0 || a->segments.count > ANYFLOW_MAX_SEGMENTS)) {
    return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  if (a->batch * a->tokens == 0) return ANYFLOW_SUCCESS;
  if (a->dim == 0 || a->x == nullptr) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (a->norm != ANYFLOW_NORM_NONE && !(a->eps >= 0.f)) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  return ANYFLOW_SUCCESS;
}
#endif
