// Shared part of the C API of the torch-free CUDA kernels in csrc/kernels: status codes, dtypes.
//
// Every launcher takes a plain struct of pointers, sizes and strides (in elements) plus a stream, checks
// it on the host with the matching static inline `*_check` function before touching the device, and
// returns ANYFLOW_SUCCESS, an ANYFLOW_ERROR_* code, or the cudaError_t of a failed launch (> 0).
// The `*_check` functions are plain host C++ so that the CPU twins and the unit tests use them too.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ANYFLOW_SUCCESS 0
// A bad argument: negative size, null pointer, unknown dtype, inconsistent table.
#define ANYFLOW_ERROR_INVALID_ARGUMENT -1
// Valid but not implemented by the kernels: too many segments/groups/ranges, head dim, alignment.
#define ANYFLOW_ERROR_UNSUPPORTED -2

// Element type of a tensor. fp32, bf16 and fp16 are accepted everywhere unless a launcher says otherwise.
typedef enum { ANYFLOW_DTYPE_F32 = 0, ANYFLOW_DTYPE_BF16 = 1, ANYFLOW_DTYPE_F16 = 2 } anyflow_dtype;

// Human-readable message for a launcher return code (defined in api.cu; needs the CUDA runtime).
const char* anyflow_error_string(int code);

#ifdef __cplusplus
}  // extern "C"

static inline bool anyflow_dtype_valid(int dtype) {
  return dtype == ANYFLOW_DTYPE_F32 || dtype == ANYFLOW_DTYPE_BF16 || dtype == ANYFLOW_DTYPE_F16;
}

static inline int anyflow_dtype_size(anyflow_dtype dtype) { return dtype == ANYFLOW_DTYPE_F32 ? 4 : 2; }

// Whether `ptr` and every stride allow `bytes`-wide vector accesses of `elem`-byte elements.
static inline bool anyflow_aligned(const void* ptr, int bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes)) == 0;
}
static inline bool anyflow_stride_aligned(int64_t stride_elems, int elem, int bytes) {
  return (stride_elems * elem) % bytes == 0;
}
#endif
