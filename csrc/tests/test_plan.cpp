// Host-side tests of the helpers the kernels and the CPU twins share: frame segment tables and the
// attention plans (query groups x key ranges -> tiles). No GPU needed.
#include <algorithm>
#include <vector>

#include "attention.h"
#include "common.cuh"
#include "segments.h"
#include "test_util.h"

using test::check;

namespace {

void test_frame_slot() {
  const int64_t B = 2, C = 3, F = 5, K = 7;
  bool ok = true;
  int64_t i = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t f = 0; f < F; ++f)
        for (int64_t k = 0; k < K; ++k, ++i) ok = ok && anyflow::frame_slot(i, C, F, K) == b * F + f;
  check(ok, "frame_slot matches nested loops over [B, C, F, HW]");
}

void test_segment_table() {
  // FAR training: 4 compressed frames of 9 tokens, 3 full frames of 39, their clean copies.
  const int64_t pairs[] = {4, 9, 3, 39, 3, 39};
  anyflow_segment_table t;
  check(anyflow_segment_table_init(&t, pairs, 3, 4 * 9 + 6 * 39, 10) == ANYFLOW_SUCCESS, "segment table builds");
  bool ok = t.count == 3;
  int64_t n = 0, row = 0;
  for (int s = 0; s < 3; ++s)
    for (int64_t f = 0; f < pairs[2 * s]; ++f, ++row)
      for (int64_t k = 0; k < pairs[2 * s + 1]; ++k, ++n) ok = ok && anyflow::segment_row(t, n) == row;
  check(ok, "segment_row gives the frame row of every token");
  check(anyflow::segment_row(t, n) == -1, "segment_row is -1 past the table");

  const int64_t with_empty[] = {0, 9, 3, 39};
  check(anyflow_segment_table_init(&t, with_empty, 2, 117, 3) == ANYFLOW_SUCCESS && t.count == 1 &&
            anyflow::segment_row(t, 116) == 2,
        "zero-frame segments are dropped");
  const int64_t five[] = {1, 1, 1, 2, 1, 3, 1, 4, 1, 5};
  check(anyflow_segment_table_init(&t, five, 5, 15, 5) == ANYFLOW_ERROR_UNSUPPORTED, "5 non-empty segments: unsupported");
  check(anyflow_segment_table_init(&t, pairs, 3, 100, 10) == ANYFLOW_ERROR_INVALID_ARGUMENT, "token total mismatch");
  check(anyflow_segment_table_init(&t, pairs, 3, 270, 9) == ANYFLOW_ERROR_INVALID_ARGUMENT, "row total mismatch");
  const int64_t bad[] = {1, 0};
  check(anyflow_segment_table_init(&t, bad, 1, 0, 1) == ANYFLOW_ERROR_INVALID_ARGUMENT, "tokens_per_frame 0");
  check(anyflow_segment_table_init(nullptr, pairs, 3, 270, 10) == ANYFLOW_ERROR_INVALID_ARGUMENT, "null table");
}

// Flat chunk-causal layout of chunks with the given token counts (each chunk sees all keys up to its end).
std::vector<int64_t> causal_layout(const std::vector<int64_t>& chunks) {
  std::vector<int64_t> flat;
  int64_t start = 0;
  for (int64_t n : chunks) {
    flat.insert(flat.end(), {start, start + n, 1, 0, start + n});
    start += n;
  }
  return flat;
}

// Every query row is in exactly one tile, tiles stay inside their group, groups come by decreasing cost.
bool plan_covers(const anyflow_attn_plan& p, int64_t q_len, const std::vector<int64_t>& flat) {
  std::vector<int> seen(q_len, 0);
  int64_t prev_cost = INT64_MAX;
  for (int g = 0; g < p.num_groups; ++g) {
    int64_t cost = 0;
    for (int r = 0; r < p.groups[g].num_ranges; ++r) cost += p.groups[g].k_end[r] - p.groups[g].k_start[r];
    if (cost > prev_cost) return false;
    prev_cost = cost;
  }
  for (int32_t tile = 0; tile < p.num_tiles; ++tile) {
    const anyflow::AttnWork w = anyflow::attn_work(p, tile);
    if (w.q1 <= w.q0 || w.q1 - w.q0 > p.block_m) return false;
    // the work's ranges are the ones the layout gives its queries
    size_t i = 0;
    bool found = false;
    while (i < flat.size()) {
      const int64_t qs = flat[i], qe = flat[i + 1], n = flat[i + 2];
      if (w.q0 >= qs && w.q1 <= qe) {
        found = w.num_ranges == n;
        for (int r = 0; found && r < n; ++r) {
          found = w.k_start[r] == flat[i + 3 + 2 * r] && w.k_end[r] == flat[i + 4 + 2 * r];
        }
      }
      i += 3 + 2 * n;
    }
    if (!found) return false;
    for (int32_t q = w.q0; q < w.q1; ++q) ++seen[q];
  }
  return std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; });
}

void test_layout_plan() {
  // The real chunk partition at 6 tokens per frame: [1,3,3,3,3,3,3,2] frames.
  std::vector<int64_t> chunks;
  for (int f : {1, 3, 3, 3, 3, 3, 3, 2}) chunks.push_back(6 * f);
  const std::vector<int64_t> flat = causal_layout(chunks);
  const int64_t total = 6 * 21;
  anyflow_attn_plan p;
  for (int block : {16, 64}) {
    check(anyflow_attn_plan_layout(&p, flat.data(), flat.size(), total, total, block) == ANYFLOW_SUCCESS,
          "chunk-causal plan builds");
    check(p.num_groups == 8 && plan_covers(p, total, flat), "tiles cover every query once, by decreasing cost");
  }
  // FAR training form: a group with three disjoint key ranges, groups out of query order.
  const std::vector<int64_t> multi = {12, 20, 3, 0, 4, 8, 10, 12, 20,  // noisy chunk: ctx, clean prefix, itself
                                      0, 4, 1, 0, 4, 4, 12, 2, 0, 4, 4, 12};
  check(anyflow_attn_plan_layout(&p, multi.data(), multi.size(), 20, 20, 16) == ANYFLOW_SUCCESS &&
            plan_covers(p, 20, multi),
        "multi-range groups in any order");

  const std::vector<int64_t> gap = {0, 4, 1, 0, 4, 5, 8, 1, 0, 8};
  check(anyflow_attn_plan_layout(&p, gap.data(), gap.size(), 8, 8, 16) == ANYFLOW_ERROR_INVALID_ARGUMENT,
        "a gap between groups is rejected");
  const std::vector<int64_t> overlap = {0, 5, 1, 0, 4, 4, 8, 1, 0, 8};
  check(anyflow_attn_plan_layout(&p, overlap.data(), overlap.size(), 8, 8, 16) == ANYFLOW_ERROR_INVALID_ARGUMENT,
        "overlapping groups are rejected");
  const std::vector<int64_t> oob = {0, 8, 1, 0, 9};
  check(anyflow_attn_plan_layout(&p, oob.data(), oob.size(), 8, 8, 16) == ANYFLOW_ERROR_INVALID_ARGUMENT,
        "a key range past kv_len is rejected");
  const std::vector<int64_t> none = {0, 8, 0};
  check(anyflow_attn_plan_layout(&p, none.data(), none.size(), 8, 8, 16) == ANYFLOW_ERROR_INVALID_ARGUMENT,
        "a group without keys is rejected");
  const std::vector<int64_t> truncated = {0, 8, 2, 0, 4};
  check(anyflow_attn_plan_layout(&p, truncated.data(), truncated.size(), 8, 8, 16) == ANYFLOW_ERROR_INVALID_ARGUMENT,
        "a truncated layout is rejected");
  const std::vector<int64_t> five = {0, 8, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  check(anyflow_attn_plan_layout(&p, five.data(), five.size(), 8, 10, 16) == ANYFLOW_ERROR_UNSUPPORTED,
        "5 key ranges in a group: unsupported");
  const std::vector<int64_t> empty_range = {0, 8, 5, 0, 1, 2, 3, 4, 5, 6, 7, 9, 9};
  check(anyflow_attn_plan_layout(&p, empty_range.data(), empty_range.size(), 8, 10, 16) == ANYFLOW_SUCCESS &&
            p.groups[0].num_ranges == 4,
        "empty key ranges are dropped");
  std::vector<int64_t> many;
  for (int i = 0; i < 65; ++i) many.insert(many.end(), {i, i + 1, 1, 0, i + 1});
  check(anyflow_attn_plan_layout(&p, many.data(), many.size(), 65, 65, 16) == ANYFLOW_ERROR_UNSUPPORTED,
        "65 groups: unsupported");
}

void test_segmented_plan() {
  anyflow_attention_args a = {};
  a.dtype = ANYFLOW_DTYPE_BF16;
  a.batch = 1;
  a.heads = 2;
  a.q_len = 100;
  a.head_dim = 64;
  int dummy = 0;
  a.q = a.out = &dummy;
  a.num_segments = 3;
  const int64_t lens[] = {13, 0, 100};
  for (int s = 0; s < 3; ++s) {
    a.segments[s].k = a.segments[s].v = &dummy;
    a.segments[s].len = lens[s];
  }
  anyflow_attn_plan p;
  check(anyflow_attn_plan_segmented(&p, &a, 64) == ANYFLOW_SUCCESS, "segmented plan builds");
  const anyflow::AttnWork w = anyflow::attn_work(p, 1);
  check(p.segmented == 1 && p.num_tiles == 2 && w.q0 == 64 && w.q1 == 100 && w.num_ranges == 3 && w.k_end[0] == 13 &&
            w.k_end[1] == 0 && w.k_end[2] == 100,
        "segmented plan: one group, range r = segment r (empty ones kept)");
  a.num_segments = 5;
  check(anyflow_attn_plan_segmented(&p, &a, 64) == ANYFLOW_ERROR_UNSUPPORTED, "5 segments: unsupported");
  a.num_segments = 0;
  check(anyflow_attn_plan_segmented(&p, &a, 64) == ANYFLOW_ERROR_INVALID_ARGUMENT, "0 segments: invalid");
}

// The key-tile walk of the tensor-core kernel (first_tile / next_tile with one tile of prefetch,
// count_tiles, range_end): every tile of every work item, over plans with empty ranges, ranges that
// start mid-tile and several ranges per group, visits exactly the group's keys, in range order, with
// count_tiles tiles, each inside one range and at most BN keys.
template <int BN>
bool walk_covers(const anyflow_attn_plan& p) {
  bool ok = true;
  for (int32_t tile = 0; tile < p.num_tiles; ++tile) {
    const anyflow::AttnWork w = anyflow::attn_work(p, tile);
    std::vector<int32_t> want, got;
    for (int r = 0; r < w.num_ranges; ++r)
      for (int32_t k = w.k_start[r]; k < w.k_end[r]; ++k) want.push_back(k);
    const int n = anyflow::count_tiles<BN>(w);
    // The kernel's loop: load_cur runs one tile ahead of comp_cur.
    anyflow::Cursor load = anyflow::first_tile<BN>(w), comp = load;
    if (n > 0) anyflow::next_tile<BN>(w, load);
    for (int it = 0; it < n; ++it) {
      if (it + 1 < n) {
        ok = ok && load.r < w.num_ranges && load.k0 < anyflow::range_end(w, load.r);
        anyflow::next_tile<BN>(w, load);
      }
      ok = ok && comp.r < w.num_ranges && comp.k0 >= w.k_start[comp.r];
      if (!ok) return false;
      const int32_t end = anyflow::range_end(w, comp.r);
      ok = ok && end == w.k_end[comp.r] && comp.k0 < end;
      for (int32_t k = comp.k0; k < comp.k0 + BN && k < end; ++k) got.push_back(k);
      anyflow::next_tile<BN>(w, comp);
    }
    ok = ok && comp.r == w.num_ranges && got == want;
  }
  return ok;
}

void test_tile_walk() {
  anyflow_attn_plan p;
  // FAR-like layout: context [0, 70), chunks of 18 tokens; each chunk sees the context, the chunks
  // before it as two ranges, itself, and an empty range.
  std::vector<int64_t> layout;
  for (int64_t c = 0; c < 6; ++c) {
    const int64_t qs = 70 + 18 * c, qe = qs + 18;
    layout.insert(layout.end(), {qs, qe, 4, 0, 70, 70, qs, qs, qs, qs, qe});
  }
  layout.insert(layout.end(), {0, 70, 1, 0, 70});
  bool ok = true;
  for (int block_m : {16, 64}) {
    ok = ok && anyflow_attn_plan_layout(&p, layout.data(), static_cast<int64_t>(layout.size()), 178, 178, block_m) ==
                   ANYFLOW_SUCCESS;
    ok = ok && walk_covers<64>(p) && walk_covers<32>(p);
  }
  // Ranges starting mid-tile and one of exactly 64 keys.
  const int64_t mid[] = {0, 5, 3, 3, 67, 100, 164, 170, 171};
  ok = ok && anyflow_attn_plan_layout(&p, mid, 9, 5, 200, 64) == ANYFLOW_SUCCESS && walk_covers<64>(p);
  // Segmented: range r = segment r, empty segments kept.
  anyflow_attention_args a = {};
  a.dtype = ANYFLOW_DTYPE_BF16;
  a.batch = a.heads = 1;
  a.q_len = 70;
  a.head_dim = 64;
  int dummy = 0;
  a.q = a.out = &dummy;
  a.num_segments = 4;
  const int64_t lens[] = {0, 24, 0, 129};
  for (int s = 0; s < 4; ++s) {
    a.segments[s].k = a.segments[s].v = &dummy;
    a.segments[s].len = lens[s];
  }
  ok = ok && anyflow_attn_plan_segmented(&p, &a, 64) == ANYFLOW_SUCCESS && walk_covers<64>(p);
  check(ok, "tile walk of the tensor-core kernel visits exactly each group's keys");
}

}  // namespace

int main() {
  test_frame_slot();
  test_segment_table();
  test_layout_plan();
  test_segmented_plan();
  test_tile_walk();
  return test::finish();
}
