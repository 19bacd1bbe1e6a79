// Registers the CPU twins (csrc/cpu) as the CPU implementations of the anyflow::c_* ops.
#include <string>

#include "cpu/twins.h"
#include "ops.h"

namespace anyflow {
namespace {

void* no_stream(const at::Tensor& /*like*/) { return nullptr; }

const char* cpu_error_string(int code) {
  if (code == ANYFLOW_ERROR_INVALID_ARGUMENT) return "invalid argument";
  if (code == ANYFLOW_ERROR_UNSUPPORTED) return "unsupported arguments";
  return code == ANYFLOW_SUCCESS ? "success" : "unknown error";
}

}  // namespace

extern const Backend kCpuBackend;
const Backend kCpuBackend = {
    "CPU twin",        c10::DeviceType::CPU, no_stream,         cpu_error_string,
    cpu::residual_norm, cpu::apply_rope,      cpu::qk_norm_rope, cpu::euler_shortcut,
    cpu::segmented_attention, cpu::chunk_causal_attention,
};

}  // namespace anyflow

TORCH_LIBRARY_IMPL(anyflow, CPU, m) { anyflow::register_backend<anyflow::kCpuBackend>(m); }
