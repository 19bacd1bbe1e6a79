// CPU twins of the CUDA launchers: same C signatures, same host-side validation (`*_check`), plain
// loops with at::parallel_for and fp32 math (double accumulators for reductions). They exist so that
// the compiled extension - schemas, argument checks, argument packing, the plan/segment helpers - is
// built and tested on machines without a GPU; they are not meant to be fast.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "kernels/attention.h"
#include "kernels/conditioning.h"
#include "kernels/euler_shortcut.h"
#include "kernels/rope.h"

namespace anyflow {
namespace cpu {

int residual_norm(const anyflow_residual_norm_args* args, void* stream);
int apply_rope(const anyflow_rope_args* args, void* stream);
int qk_norm_rope(const anyflow_rope_args* args, void* stream);
int euler_shortcut(const anyflow_euler_args* args, void* stream);
int segmented_attention(const anyflow_attention_args* args, void* stream);
int chunk_causal_attention(const anyflow_attention_args* args, const int64_t* layout, int64_t layout_len, void* stream);

inline float load(const void* p, anyflow_dtype dtype, int64_t i) {
  switch (dtype) {
    case ANYFLOW_DTYPE_BF16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case ANYFLOW_DTYPE_F16:
      return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case ANYFLOW_DTYPE_F32:
      break;
  }
  return static_cast<const float*>(p)[i];
}

inline void store(void* p, anyflow_dtype dtype, int64_t i, float v) {
  switch (dtype) {
    case ANYFLOW_DTYPE_BF16:
      static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v);
      return;
    case ANYFLOW_DTYPE_F16:
      static_cast<c10::Half*>(p)[i] = c10::Half(v);
      return;
    case ANYFLOW_DTYPE_F32:
      break;
  }
  static_cast<float*>(p)[i] = v;
}

// v rounded to dtype and back (what a tensor of that dtype stores).
inline float round_to(anyflow_dtype dtype, float v) {
  switch (dtype) {
    case ANYFLOW_DTYPE_BF16:
      return static_cast<float>(c10::BFloat16(v));
    case ANYFLOW_DTYPE_F16:
      return static_cast<float>(c10::Half(v));
    case ANYFLOW_DTYPE_F32:
      break;
  }
  return v;
}

}  // namespace cpu
}  // namespace anyflow
