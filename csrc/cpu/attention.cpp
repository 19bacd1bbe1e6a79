// CPU twins of the FAR attention launchers. They run the same plan (attention.h) as the CUDA kernels -
// groups ordered by cost, tiles of block_m queries, key ranges per group, segment r for range r in the
// segmented case - so the plan builders and the work lookup are tested against the torch reference.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/twins.h"

namespace anyflow {
namespace cpu {
namespace {

constexpr int kBlockM = 64;

void run_plan(const anyflow_attention_args& a, const anyflow_attn_plan& plan) {
  const int64_t bh_total = a.batch * a.heads, tiles = plan.num_tiles, d = a.head_dim;
  at::parallel_for(0, bh_total * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(d), scores;
    std::vector<double> acc(d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / tiles, b = bh / a.heads, h = bh % a.heads;
      const AttnWork w = attn_work(plan, static_cast<int32_t>(item % tiles));
      for (int32_t qr = w.q0; qr < w.q1; ++qr) {
        const int64_t qo = b * a.q_stride_b + h * a.q_stride_h + qr * a.q_stride_l;
        for (int64_t k = 0; k < d; ++k) q[k] = load(a.q, a.dtype, qo + k);
        // Scores of every key the group sees, in range order.
        scores.clear();
        float mx = -std::numeric_limits<float>::infinity();
        for (int r = 0; r < w.num_ranges; ++r) {
          const anyflow_kv_segment& s = a.segments[plan.segmented ? r : 0];
          for (int32_t key = w.k_start[r]; key < w.k_end[r]; ++key) {
            const int64_t ko = b * s.k_stride_b + h * s.k_stride_h + key * s.k_stride_l;
            double dot = 0.0;
            for (int64_t k = 0; k < d; ++k) dot += static_cast<double>(q[k]) * load(s.k, a.dtype, ko + k);
            const float x = static_cast<float>(dot) * a.scale;
            scores.push_back(x);
            mx = x > mx ? x : mx;
          }
        }
        double l = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        size_t j = 0;
        for (int r = 0; r < w.num_ranges; ++r) {
          const anyflow_kv_segment& s = a.segments[plan.segmented ? r : 0];
          for (int32_t key = w.k_start[r]; key < w.k_end[r]; ++key, ++j) {
            const double p = std::exp(static_cast<double>(scores[j]) - mx);
            l += p;
            const int64_t vo = b * s.v_stride_b + h * s.v_stride_h + key * s.v_stride_l;
            for (int64_t k = 0; k < d; ++k) acc[k] += p * load(s.v, a.dtype, vo + k);
          }
        }
        const int64_t oo = b * a.out_stride_b + h * a.out_stride_h + qr * a.out_stride_l;
        for (int64_t k = 0; k < d; ++k) store(a.out, a.dtype, oo + k, l > 0 ? static_cast<float>(acc[k] / l) : 0.f);
        if (a.lse != nullptr) {
          a.lse[bh * a.q_len + qr] =
              l > 0 ? static_cast<float>(mx + std::log(l)) : -std::numeric_limits<float>::infinity();
        }
      }
    }
  });
}

}  // namespace

int segmented_attention(const anyflow_attention_args* args, void* /*stream*/) {
  anyflow_attn_plan plan;
  const int rc = anyflow_attn_plan_segmented(&plan, args, kBlockM);
  if (rc != ANYFLOW_SUCCESS) return rc;
  if (args->batch * args->heads * args->q_len > 0) run_plan(*args, plan);
  return ANYFLOW_SUCCESS;
}

int chunk_causal_attention(const anyflow_attention_args* args, const int64_t* layout, int64_t layout_len,
                           void* /*stream*/) {
  int rc = anyflow_attention_check(args);
  if (rc != ANYFLOW_SUCCESS) return rc;
  if (args->num_segments != 1) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  anyflow_attn_plan plan;
  rc = anyflow_attn_plan_layout(&plan, layout, layout_len, args->q_len, args->segments[0].len, kBlockM);
  if (rc != ANYFLOW_SUCCESS) return rc;
  if (args->batch * args->heads * args->q_len > 0) run_plan(*args, plan);
  return ANYFLOW_SUCCESS;
}

}  // namespace cpu
}  // namespace anyflow
