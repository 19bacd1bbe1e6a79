// Host-side unit test of the torch-free CUDA kernels (registered with ctest by CMakeLists.txt).
//
// Without a GPU it checks the index math, the argument validation and that a launch reports a clear
// error code; with a GPU it also runs the kernel (fp32 and bf16 u) against a host reference.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "common.cuh"
#include "euler_shortcut.h"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

// Flat index of a [batch, outer, frames, inner] tensor visits frame_slot = b * frames + f.
void test_frame_slot() {
  const int64_t B = 2, C = 3, F = 5, K = 7;  // e.g. [B, C, F, H*W] with H*W = 7
  bool ok = true;
  int64_t i = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t f = 0; f < F; ++f)
        for (int64_t k = 0; k < K; ++k, ++i) ok = ok && anyflow::frame_slot(i, C, F, K) == b * F + f;
  check(ok, "frame_slot matches nested loops over [B, C, F, HW]");
  check(anyflow::frame_slot(4 * 10, 1, 4, 10) == 4, "frame_slot crosses into the next batch");
}

void test_argument_checks() {
  float x = 0.f;
  check(anyflow_euler_shortcut_f32(&x, &x, &x, ANYFLOW_DTYPE_F32, &x, -1, 1, 1, 1, nullptr) ==
            ANYFLOW_ERROR_INVALID_ARGUMENT,
        "negative size is rejected");
  check(anyflow_euler_shortcut_f32(nullptr, &x, &x, ANYFLOW_DTYPE_F32, &x, 1, 1, 1, 1, nullptr) ==
            ANYFLOW_ERROR_INVALID_ARGUMENT,
        "null output is rejected");
  check(anyflow_euler_shortcut_f32(nullptr, nullptr, nullptr, ANYFLOW_DTYPE_F32, nullptr, 0, 4, 4, 4, nullptr) ==
            ANYFLOW_SUCCESS,
        "empty tensor is a no-op");
  check(std::strlen(anyflow_error_string(ANYFLOW_ERROR_INVALID_ARGUMENT)) > 0, "error strings exist");
}

uint16_t to_bf16_bits(float v) {  // exact for the values used below (few mantissa bits)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

bool run_on_device(anyflow_dtype u_dtype) {
  const int64_t B = 2, C = 3, F = 4, K = 33, n = B * C * F * K;
  std::vector<float> z(n), u(n), dt(B * F), out(n, NAN);
  std::vector<uint16_t> u_bf16(n);
  for (int64_t i = 0; i < n; ++i) {
    z[i] = static_cast<float>((i * 37) % 101) / 16.f - 3.f;
    u[i] = static_cast<float>((i * 53) % 97) / 8.f - 6.f;
    u_bf16[i] = to_bf16_bits(u[i]);
  }
  for (int64_t j = 0; j < B * F; ++j) dt[j] = 0.125f * static_cast<float>(j + 1);
  const size_t u_bytes = u_dtype == ANYFLOW_DTYPE_F32 ? n * sizeof(float) : n * sizeof(uint16_t);
  float *d_z = nullptr, *d_out = nullptr, *d_dt = nullptr;
  void* d_u = nullptr;
  cudaMalloc(&d_z, n * sizeof(float));
  cudaMalloc(&d_out, n * sizeof(float));
  cudaMalloc(&d_dt, dt.size() * sizeof(float));
  cudaMalloc(&d_u, u_bytes);
  cudaMemcpy(d_z, z.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(d_dt, dt.data(), dt.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(d_u, u_dtype == ANYFLOW_DTYPE_F32 ? static_cast<const void*>(u.data()) : u_bf16.data(), u_bytes,
             cudaMemcpyHostToDevice);
  int rc = anyflow_euler_shortcut_f32(d_out, d_z, d_u, u_dtype, d_dt, B, C, F, K, nullptr);
  cudaMemcpy(out.data(), d_out, n * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(d_z);
  cudaFree(d_out);
  cudaFree(d_dt);
  cudaFree(d_u);
  if (rc != ANYFLOW_SUCCESS) {
    std::printf("launch failed: %s\n", anyflow_error_string(rc));
    return false;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float ref = z[i] - dt[anyflow::frame_slot(i, C, F, K)] * u[i];
    if (!(std::fabs(out[i] - ref) <= 1e-6f * (1.f + std::fabs(ref)))) return false;
  }
  return true;
}

}  // namespace

int main() {
  test_frame_slot();
  test_argument_checks();

  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::printf("no CUDA device (%s): checking that a launch reports an error\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    float x = 0.f;
    const int rc = anyflow_euler_shortcut_f32(&x, &x, &x, ANYFLOW_DTYPE_F32, &x, 1, 1, 1, 1, nullptr);
    std::printf("launch returned %d (%s)\n", rc, anyflow_error_string(rc));
    check(rc != ANYFLOW_SUCCESS && rc != ANYFLOW_ERROR_INVALID_ARGUMENT, "launch without a device fails cleanly");
  } else {
    check(run_on_device(ANYFLOW_DTYPE_F32), "kernel matches host reference (fp32 u)");
    check(run_on_device(ANYFLOW_DTYPE_BF16), "kernel matches host reference (bf16 u)");
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
