// Frame-segment table: maps a token of a frame-major sequence to its per-frame modulation row.
//
// A sequence is ((frames, tokens_per_frame), ...) in token order (FAR: compressed context, full frames,
// clean copies). The table keeps the non-empty segments (at most ANYFLOW_MAX_SEGMENTS) with their first
// token and first row, so a kernel finds the row of token n with at most 4 compares and one division.
#pragma once

#include <stdint.h>

#include "api.h"
#include "common.cuh"

#define ANYFLOW_MAX_SEGMENTS 4

typedef struct {
  int32_t count;  // non-empty segments
  int64_t token_start[ANYFLOW_MAX_SEGMENTS];
  int64_t token_end[ANYFLOW_MAX_SEGMENTS];
  int64_t row_start[ANYFLOW_MAX_SEGMENTS];
  int64_t tokens_per_frame[ANYFLOW_MAX_SEGMENTS];
  int64_t num_tokens;  // sum of frames * tokens_per_frame
  int64_t num_rows;    // sum of frames
} anyflow_segment_table;

// Build `table` from `num_pairs` (frames, tokens_per_frame) pairs stored flat in `pairs`; segments with
// zero frames are dropped. Returns ANYFLOW_ERROR_INVALID_ARGUMENT for negative frames, tokens_per_frame
// <= 0, or totals other than `num_tokens` / `num_rows`, and ANYFLOW_ERROR_UNSUPPORTED for more than
// ANYFLOW_MAX_SEGMENTS non-empty segments.
static inline int anyflow_segment_table_init(anyflow_segment_table* table, const int64_t* pairs, int64_t num_pairs,
                                             int64_t num_tokens, int64_t num_rows) {
  if (table == nullptr || num_pairs < 0 || (num_pairs > 0 && pairs == nullptr)) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  anyflow_segment_table t = {};
  int64_t token = 0, row = 0;
  bool too_many = false;
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t frames = pairs[2 * i], tpf = pairs[2 * i + 1];
    if (frames < 0 || tpf <= 0 || frames > (INT64_C(1) << 40) || tpf > (INT64_C(1) << 40)) {
      return ANYFLOW_ERROR_INVALID_ARGUMENT;
    }
    if (frames == 0) continue;
    if (t.count == ANYFLOW_MAX_SEGMENTS) {
      too_many = true;
    } else {
      t.token_start[t.count] = token;
      t.token_end[t.count] = token + frames * tpf;
      t.row_start[t.count] = row;
      t.tokens_per_frame[t.count] = tpf;
      ++t.count;
    }
    token += frames * tpf;
    row += frames;
  }
  if (token != num_tokens || row != num_rows) return ANYFLOW_ERROR_INVALID_ARGUMENT;
  if (too_many) return ANYFLOW_ERROR_UNSUPPORTED;
  t.num_tokens = token;
  t.num_rows = row;
  *table = t;
  return ANYFLOW_SUCCESS;
}

namespace anyflow {

// Modulation row of token `n` (0 <= n < num_tokens), -1 outside the table.
ANYFLOW_HOST_DEVICE int64_t segment_row(const anyflow_segment_table& t, int64_t n) {
  int64_t row = -1;
ANYFLOW_UNROLL
  for (int s = ANYFLOW_MAX_SEGMENTS - 1; s >= 0; --s) {
    if (s < t.count && n >= t.token_start[s] && n < t.token_end[s]) {
      row = t.row_start[s] + (n - t.token_start[s]) / t.tokens_per_frame[s];
    }
  }
  return row;
}

}  // namespace anyflow
