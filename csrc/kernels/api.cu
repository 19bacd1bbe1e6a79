// Shared launcher API pieces that need the CUDA runtime.
#include <cuda_runtime.h>

#include "api.h"

extern "C" const char* anyflow_error_string(int code) {
  if (code == ANYFLOW_SUCCESS) return "success";
  if (code == ANYFLOW_ERROR_INVALID_ARGUMENT) {
    return "invalid argument (negative size, null pointer, unknown dtype or inconsistent table)";
  }
  if (code == ANYFLOW_ERROR_UNSUPPORTED) {
    return "unsupported by the kernels (too many segments/groups/ranges, head dim, row width or grid size)";
  }
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
