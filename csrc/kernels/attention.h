// C API of the FAR attention forward kernels (anyflow.ops.segmented_attention / chunk_causal_attention).
//
// Layouts are [batch, heads, tokens, head_dim] with unit stride along head_dim and any other strides
// (the KV cache hands out strided views). Softmax in fp32 with online (flash) rescaling; output in the
// input dtype; optional fp32 log-sum-exp (natural log) [batch, heads, q_len], contiguous.
//
// Work decomposition ("plan"): the queries are split into groups, each with up to
// ANYFLOW_ATTN_MAX_RANGES key ranges it attends to in full, and every group into query tiles of the
// kernel's block size. A program (thread block) owns one tile of one (batch, head) and walks only its
// group's key ranges, so fully masked tiles are never visited and nothing inside a range is masked.
//   segmented:    one group [0, q_len); range r is the whole of KV segment r (up to 4 separate tensors).
//   chunk-causal: groups and ranges from a layout (anyflow.ops.AttentionLayout), all in KV segment 0.
// Groups are ordered by decreasing number of keys, so the longest tiles are scheduled first.
//
// Implementations: a tensor-core path (mma.sync m16n8k16, bf16/fp16, head_dim 64 or 128, 16-byte
// aligned pointers and strides, sm_80+) and a generic SIMT path (fp32/bf16/fp16, head_dim <= 256).
#pragma once

#include <stdint.h>

#include "api.h"
#include "common.cuh"

#define ANYFLOW_ATTN_MAX_SEGMENTS 4
#define ANYFLOW_ATTN_MAX_RANGES 4
#define ANYFLOW_ATTN_MAX_GROUPS 64
#define ANYFLOW_ATTN_MAX_HEAD_DIM 256

typedef struct {
  const void* k;
  const void* v;
  int64_t k_stride_b, k_stride_h, k_stride_l;
  int64_t v_stride_b, v_stride_h, v_stride_l;
  int64_t len;
} anyflow_kv_segment;

typedef enum { ANYFLOW_ATTN_AUTO = 0, ANYFLOW_ATTN_SIMT = 1, ANYFLOW_ATTN_MMA = 2 } anyflow_attn_impl;

typedef struct {
  anyflow_dtype dtype;  // q, k, v, out
  int64_t batch, heads, q_len, head_dim;
  const void* q;
  int64_t q_stride_b, q_stride_h, q_stride_l;
  void* out;
  int64_t out_stride_b, out_stride_h, out_stride_l;
  float* lse;  // optional
  float scale;
  int32_t num_segments;  // 1 for chunk-causal
  anyflow_kv_segment segments[ANYFLOW_ATTN_MAX_SEGMENTS];
  anyflow_attn_impl impl;  // AUTO picks the tensor-core path when it applies
} anyflow_attention_args;

typedef struct {
  int32_t q_start, q_end, tile_start, num_ranges;
  int32_t k_start[ANYFLOW_ATTN_MAX_RANGES];
  int32_t k_end[ANYFLOW_ATTN_MAX_RANGES];
} anyflow_attn_group;

typedef struct {
  int32_t num_groups, num_tiles, block_m, segmented;  // segmented: range r reads KV segment r
  anyflow_attn_group groups[ANYFLOW_ATTN_MAX_GROUPS];
} anyflow_attn_plan;

#ifdef __cplusplus
extern "C" {
#endif

int anyflow_segmented_attention(const anyflow_attention_args* args, void* stream);

// `layout` is flat: per group q_start, q_end, n, then n pairs k_start, k_end (keys of segment 0).
int anyflow_chunk_causal_attention(const anyflow_attention_args* args, const int64_t* layout, int64_t layout_len,
                                   void* stream);

#ifdef __cplusplus
}  // extern "C"

static inline int anyflow_attention_check(const anyflow_attention_args* a) {
  if (a == nullptr || !anyflow_dtype_valid(a->dtype)) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (a->batch < 0 || a->heads < 0 || a->q_len < 0 || a->head_dim <= 0) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (a->impl != ANYFLOW_ATTN_AUTO && a->impl != ANYFLOW_ATTN_SIMT && a->impl != ANYFLOW_ATTN_MMA) {
    return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  if (a->num_segments < 1 || a->num_segments > ANYFLOW_ATTN_MAX_SEGMENTS) {
    return a->num_segments < 1 ? ANYFLOW_ERROR_INVALID_ARGUMENT : ANYFLOW_ERROR_UNSUPPORTED;
  }
  for (int s = 0; s < a->num_segments; ++s) {
    const anyflow_kv_segment& g = a->segments[s];
    if (g.len < 0 || g.len >= (INT64_C(1) << 31)) return g.len < 0 ? ANYFLOW_ERROR_INVALID_ARGUMENT : ANYFLOW_ERROR_UNSUPPORTED;
    if (g.len > 0 && a->batch * a->heads * a->q_len > 0 && (g.k == nullptr || g.v == nullptr)) {
      return ANYFLOW_ERROR_INVALID_ARGUMENT;
    }
  }
  if (a->head_dim > ANYFLOW_ATTN_MAX_HEAD_DIM) return ANYFLOW_ERROR_UNSUPPORTED;
  if (a->q_len >= (INT64_C(1) << 31) || a->batch * a->heads > 65535) return ANYFLOW_ERROR_UNSUPPORTED;
  if (a->batch * a->heads * a->q_len == 0) return ANYFLOW_SUCCESS;
  if (a->q == nullptr || a->out == nullptr) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  return ANYFLOW_SUCCESS;
}

// Orders groups by decreasing key count and numbers their tiles of `block_m` queries.
static inline void anyflow_attn_plan_finish(anyflow_attn_plan* p) {
  for (int i = 1; i < p->num_groups; ++i) {  // stable insertion sort, at most 64 entries
    const anyflow_attn_group g = p->groups[i];
    int64_t keys = 0;
    for (int r = 0; r < g.num_ranges; ++r) keys += g.k_end[r] - g.k_start[r];
    int j = i - 1;
    for (; j >= 0; --j) {
      int64_t kj = 0;
      for (int r = 0; r < p->groups[j].num_ranges; ++r) kj += p->groups[j].k_end[r] - p->groups[j].k_start[r];
      if (kj >= keys) break;
      p->groups[j + 1] = p->groups[j];
    }
    p->groups[j + 1] = g;
  }
  int32_t tiles = 0;
  for (int i = 0; i < p->num_groups; ++i) {
    p->groups[i].tile_start = tiles;
    tiles += static_cast<int32_t>(anyflow::ceil_div(p->groups[i].q_end - p->groups[i].q_start, p->block_m));
  }
  p->num_tiles = tiles;
}

// Plan of a segmented call: one group of all queries; range r = all keys of segment r (possibly empty).
static inline int anyflow_attn_plan_segmented(anyflow_attn_plan* p, const anyflow_attention_args* a, int block_m) {
  if (p == nullptr || a == nullptr || block_m <= 0) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  const int rc = anyflow_attention_check(a);
  if (rc != ANYFLOW_SUCCESS) return rc;
  *p = anyflow_attn_plan{};
  p->block_m = block_m;
  p->segmented = 1;
  if (a->q_len == 0) return ANYFLOW_SUCCESS;
  anyflow_attn_group& g = p->groups[0];
  g.q_start = 0;
  g.q_end = static_cast<int32_t>(a->q_len);
  g.num_ranges = a->num_segments;
  for (int s = 0; s < a->num_segments; ++s) {
    g.k_start[s] = 0;
    g.k_end[s] = static_cast<int32_t>(a->segments[s].len);
  }
  p->num_groups = 1;
  anyflow_attn_plan_finish(p);
  return ANYFLOW_SUCCESS;
}

// Plan of a chunk-causal call from a flat layout (see anyflow_chunk_causal_attention). The groups must
// tile [0, q_len) exactly (in any order) and every group needs at least one key; ranges lie in
// [0, kv_len]; empty ranges are dropped. More than ANYFLOW_ATTN_MAX_GROUPS groups or
// ANYFLOW_ATTN_MAX_RANGES non-empty ranges per group is ANYFLOW_ERROR_UNSUPPORTED.
static inline int anyflow_attn_plan_layout(anyflow_attn_plan* p, const int64_t* layout, int64_t layout_len, int64_t q_len,
                                           int64_t kv_len, int block_m) {
  if (p == nullptr || block_m <= 0 || layout_len < 0 || (layout_len > 0 && layout == nullptr)) {
    return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  if (q_len < 0 || kv_len < 0) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (q_len >= (INT64_C(1) << 31) || kv_len >= (INT64_C(1) << 31)) return ANYFLOW_ERROR_UNSUPPORTED;
  *p = anyflow_attn_plan{};
  p->block_m = block_m;
  bool unsupported = false;
  int64_t covered = 0, i = 0;
  while (i < layout_len) {
    if (i + 3 > layout_len) return ANYFLOW_ERROR_INVALID_ARGUMENT;
    const int64_t qs = layout[i], qe = layout[i + 1], n = layout[i + 2];
    if (qs < 0 || qe <= qs || qe > q_len || n < 1 || i + 3 + 2 * n > layout_len) return ANYFLOW_ERROR_INVALID_ARGUMENT;
    anyflow_attn_group g = {};
    g.q_start = static_cast<int32_t>(qs);
    g.q_end = static_cast<int32_t>(qe);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t ks = layout[i + 3 + 2 * r], ke = layout[i + 4 + 2 * r];
      if (ks < 0 || ke < ks || ke > kv_len) return ANYFLOW_ERROR_INVALID_ARGUMENT;
      if (ke == ks) continue;
      if (g.num_ranges == ANYFLOW_ATTN_MAX_RANGES) {
        unsupported = true;
        continue;
      }
      g.k_start[g.num_ranges] = static_cast<int32_t>(ks);
      g.k_end[g.num_ranges] = static_cast<int32_t>(ke);
      ++g.num_ranges;
    }
    if (g.num_ranges == 0) return ANYFLOW_ERROR_INVALID_ARGUMENT;
    if (p->num_groups == ANYFLOW_ATTN_MAX_GROUPS) {
      unsupported = true;
    } else {
      p->groups[p->num_groups++] = g;
    }
    covered += qe - qs;
    i += 3 + 2 * n;
  }
  if (unsupported) return ANYFLOW_ERROR_UNSUPPORTED;
  // The groups must tile [0, q_len): disjoint and covering (checked on a copy sorted by q_start).
  if (covered != q_len) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  int32_t starts[ANYFLOW_ATTN_MAX_GROUPS], ends[ANYFLOW_ATTN_MAX_GROUPS];
  for (int a = 0; a < p->num_groups; ++a) {
    int b = a;
    for (; b > 0 && starts[b - 1] > p->groups[a].q_start; --b) {
      starts[b] = starts[b - 1];
      ends[b] = ends[b - 1];
    }
    starts[b] = p->groups[a].q_start;
    ends[b] = p->groups[a].q_end;
  }
  for (int a = 0; a < p->num_groups; ++a) {
    if (starts[a] != (a == 0 ? 0 : ends[a - 1])) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  }
  p->segmented = 0;
  anyflow_attn_plan_finish(p);
  return ANYFLOW_SUCCESS;
}
#endif  // __cplusplus

namespace anyflow {

// Group of tile `tile` (0 <= tile < plan.num_tiles) and its query rows [q0, q1). Only compile-time
// indices into the plan: on the device the plan is a kernel parameter, and a dynamic index would copy
// the whole struct to local memory.
struct AttnWork {
  int32_t q0, q1, num_ranges;
  int32_t k_start[ANYFLOW_ATTN_MAX_RANGES];
  int32_t k_end[ANYFLOW_ATTN_MAX_RANGES];
};

ANYFLOW_HOST_DEVICE AttnWork attn_work(const anyflow_attn_plan& p, int32_t tile) {
  AttnWork w = {};
ANYFLOW_UNROLL
  for (int i = 0; i < ANYFLOW_ATTN_MAX_GROUPS; ++i) {
    if (i < p.num_groups && tile >= p.groups[i].tile_start) {
      const anyflow_attn_group& g = p.groups[i];
      w.q0 = g.q_start + (tile - g.tile_start) * p.block_m;
      w.q1 = w.q0 + p.block_m < g.q_end ? w.q0 + p.block_m : g.q_end;
      w.num_ranges = g.num_ranges;
ANYFLOW_UNROLL
      for (int r = 0; r < ANYFLOW_ATTN_MAX_RANGES; ++r) {
        w.k_start[r] = g.k_start[r];
        w.k_end[r] = g.k_end[r];
      }
    }
  }
  return w;
}

// Walk of the key tiles of a work item (the tensor-core path, which prefetches one tile ahead): range
// r and first key k0 of the current tile, whose keys are [k0, min(k0 + BN, k_end[r])). Empty ranges
// are skipped; past the last tile r == num_ranges.
struct Cursor {
  int r;
  int32_t k0;
};

template <int BN>
ANYFLOW_HOST_DEVICE void skip_empty(const AttnWork& w, Cursor& c) {
  while (c.r < w.num_ranges && c.k0 >= w.k_end[c.r]) {
    ++c.r;
    if (c.r < w.num_ranges) c.k0 = w.k_start[c.r];
  }
}

template <int BN>
ANYFLOW_HOST_DEVICE Cursor first_tile(const AttnWork& w) {
  Cursor c = {0, w.num_ranges > 0 ? w.k_start[0] : 0};
  skip_empty<BN>(w, c);
  return c;
}

template <int BN>
ANYFLOW_HOST_DEVICE void next_tile(const AttnWork& w, Cursor& c) {
  c.k0 += BN;
  skip_empty<BN>(w, c);
}

template <int BN>
ANYFLOW_HOST_DEVICE int count_tiles(const AttnWork& w) {
  int n = 0;
  for (int r = 0; r < w.num_ranges; ++r) n += static_cast<int>(ceil_div(w.k_end[r] - w.k_start[r], BN));
  return n;
}

// w.k_end[r] with compile-time indices only (see attn_work).
ANYFLOW_HOST_DEVICE int32_t range_end(const AttnWork& w, int r) {
  int32_t e = 0;
ANYFLOW_UNROLL
  for (int i = 0; i < ANYFLOW_ATTN_MAX_RANGES; ++i) {
    if (i == r) e = w.k_end[i];
  }
  return e;
}

}  // namespace anyflow
