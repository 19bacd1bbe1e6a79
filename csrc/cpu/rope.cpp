// CPU twins of anyflow_apply_rope and anyflow_qk_norm_rope.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "cpu/twins.h"

namespace anyflow {
namespace cpu {
namespace {

// Rotates the interleaved pairs of one head in place with table row `l`.
void rotate(float* v, const anyflow_rope_args& a, int64_t l) {
  const int64_t half = a.head_dim / 2;
  const float* c = a.cos + l * half;
  const float* s = a.sin + l * half;
  for (int64_t j = 0; j < half; ++j) {
    const float re = v[2 * j], im = v[2 * j + 1];
    v[2 * j] = re * c[j] - im * s[j];
    v[2 * j + 1] = re * s[j] + im * c[j];
  }
}

}  // namespace

int apply_rope(const anyflow_rope_args* args, void* /*stream*/) {
  const int rc = anyflow_rope_check(args, false);
  if (rc != ANYFLOW_SUCCESS) return rc;
  const anyflow_rope_args a = *args;
  const int64_t heads_total = a.batch * a.tokens * a.heads, dh = a.head_dim;
  if (heads_total * dh == 0) return ANYFLOW_SUCCESS;
  at::parallel_for(0, heads_total, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> v(dh);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i % a.heads, l = (i / a.heads) % a.tokens, b = i / (a.heads * a.tokens);
      const int64_t xo = b * a.x_stride_b + l * a.x_stride_l + h * a.x_stride_h;
      for (int64_t k = 0; k < dh; ++k) v[k] = load(a.x, a.dtype, xo + k);
      rotate(v.data(), a, l);
      for (int64_t k = 0; k < dh; ++k) store(a.out, a.dtype, i * dh + k, v[k]);
    }
  });
  return ANYFLOW_SUCCESS;
}

int qk_norm_rope(const anyflow_rope_args* args, void* /*stream*/) {
  const int rc = anyflow_rope_check(args, true);
  if (rc != ANYFLOW_SUCCESS) return rc;
  const anyflow_rope_args a = *args;
  const int64_t rows = a.batch * a.tokens, ch = a.heads * a.head_dim;
  if (rows * ch == 0) return ANYFLOW_SUCCESS;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(ch);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / a.tokens, l = row % a.tokens;
      const int64_t xo = b * a.x_stride_b + l * a.x_stride_l;
      double sq = 0.0;
      for (int64_t k = 0; k < ch; ++k) {
        v[k] = load(a.x, a.dtype, xo + k);
        sq += static_cast<double>(v[k]) * v[k];
      }
      const float r = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(ch) + a.eps));
      for (int64_t k = 0; k < ch; ++k) v[k] = v[k] * r * load(a.weight, a.weight_dtype, k);
      for (int64_t h = 0; h < a.heads; ++h) rotate(v.data() + h * a.head_dim, a, l);
      for (int64_t k = 0; k < ch; ++k) store(a.out, a.dtype, row * ch + k, v[k]);
    }
  });
  return ANYFLOW_SUCCESS;
}

}  // namespace cpu
}  // namespace anyflow
