// CPU twin of anyflow_euler_shortcut.
#include <ATen/Parallel.h>

#include "common.cuh"
#include "cpu/twins.h"

namespace anyflow {
namespace cpu {

int euler_shortcut(const anyflow_euler_args* args, void* /*stream*/) {
  const int rc = anyflow_euler_check(args);
  if (rc != ANYFLOW_SUCCESS) return rc;
  const anyflow_euler_args a = *args;
  const int64_t n = a.batch * a.outer * a.frames * a.inner;
  if (n == 0) return ANYFLOW_SUCCESS;
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float z = load(a.latents, a.latents_dtype, i);
      if ((i / a.inner) % a.frames < a.num_context_frames) {
        store(a.out, a.latents_dtype, i, z);
        continue;
      }
      float u = load(a.velocity, a.velocity_dtype, i);
      if (a.cfg) u = u + a.guidance_scale * (load(a.velocity, a.velocity_dtype, i + n) - u);
      store(a.out, a.latents_dtype, i, z - a.dt[frame_slot(i, a.outer, a.frames, a.inner)] * u);
    }
  });
  return ANYFLOW_SUCCESS;
}

}  // namespace cpu
}  // namespace anyflow
