// CPU twin of anyflow_residual_norm (adaLN modulate / gated residual / residual + LayerNorm).
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "cpu/twins.h"

namespace anyflow {
namespace cpu {

int residual_norm(const anyflow_residual_norm_args* args, void* /*stream*/) {
  const int rc = anyflow_residual_norm_check(args);
  if (rc != ANYFLOW_SUCCESS) return rc;
  const anyflow_residual_norm_args a = *args;
  const int64_t rows = a.batch * a.tokens, d = a.dim;
  if (rows == 0) return ANYFLOW_SUCCESS;
  const bool per_frame = a.gate != nullptr || a.norm == ANYFLOW_NORM_MODULATE;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(d);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / a.tokens, n = row % a.tokens;
      const int64_t f = per_frame ? segment_row(a.segments, n) : 0;
      const int64_t xo = b * a.x_stride_b + n * a.x_stride_n, yo = b * a.y_stride_b + n * a.y_stride_n;
      for (int64_t i = 0; i < d; ++i) {
        float x = load(a.x, a.dtype, xo + i);
        if (a.y != nullptr) {
          const float y = load(a.y, a.dtype, yo + i);
          x = a.gate != nullptr ? x + y * load(a.gate, a.gate_dtype, b * a.gate_stride_b + f * a.gate_stride_r + i)
                                : x + y;
          x = round_to(a.dtype, x);
          if (a.x_out != nullptr) store(a.x_out, a.dtype, row * d + i, x);
        }
        v[i] = x;
      }
      if (a.norm == ANYFLOW_NORM_NONE) continue;
      double sum = 0.0;
      for (int64_t i = 0; i < d; ++i) sum += v[i];
      const double mean = sum / static_cast<double>(d);
      double sq = 0.0;
      for (int64_t i = 0; i < d; ++i) sq += (v[i] - mean) * (v[i] - mean);
      const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(d) + a.eps));
      const float m = static_cast<float>(mean);
      for (int64_t i = 0; i < d; ++i) {
        float h = (v[i] - m) * rstd;
        if (a.norm == ANYFLOW_NORM_MODULATE) {
          const float sc = load(a.scale, a.scale_dtype, b * a.scale_stride_b + f * a.scale_stride_r + i);
          const float sh = load(a.shift, a.shift_dtype, b * a.shift_stride_b + f * a.shift_stride_r + i);
          h = h * (1.f + sc) + sh;
        } else {
          if (a.weight != nullptr) h = h * load(a.weight, a.weight_dtype, i);
          if (a.bias != nullptr) h = h + load(a.bias, a.bias_dtype, i);
        }
        store(a.h_out, a.dtype, row * d + i, h);
      }
    }
  });
  return ANYFLOW_SUCCESS;
}

}  // namespace cpu
}  // namespace anyflow
