// Registers the CUDA launchers (csrc/kernels) as the CUDA implementations of the anyflow::c_* ops.
// Compiled only in the CUDA build. It needs no CUDA or c10/cuda headers: the current stream comes from
// c10's device-generic guard interface, so this file also compiles against a CPU-only torch.
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "ops.h"

namespace anyflow {
namespace {

// The current CUDA stream of like's device (torch.cuda.current_stream()), as a cudaStream_t.
void* current_stream(const at::Tensor& like) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(like.device()).native_handle();
}

}  // namespace

extern const Backend kCudaBackend;
const Backend kCudaBackend = {
    "CUDA",
    c10::DeviceType::CUDA,
    current_stream,
    anyflow_error_string,
    anyflow_residual_norm,
    anyflow_apply_rope,
    anyflow_qk_norm_rope,
    anyflow_euler_shortcut,
    anyflow_segmented_attention,
    anyflow_chunk_causal_attention,
};

}  // namespace anyflow

TORCH_LIBRARY_IMPL(anyflow, CUDA, m) { anyflow::register_backend<anyflow::kCudaBackend>(m); }
