// The anyflow::c_* ops on top of a "backend": the CUDA launchers of csrc/kernels or their CPU twins.
//
// Both backends expose the same C signatures (an argument struct and a stream), so the op bodies -
// argument checks with clear errors, output allocation, filling the argument structs - are written
// once here and shared: the CPU twins exercise exactly the checks and argument packing the CUDA
// build uses. csrc/cpu/register.cpp and csrc/cuda/register.cpp instantiate register_backend<>().
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "kernels/attention.h"
#include "kernels/conditioning.h"
#include "kernels/euler_shortcut.h"
#include "kernels/rope.h"

namespace anyflow {

struct Backend {
  const char* name;  // "CPU twin" / "CUDA"
  c10::DeviceType device_type;
  void* (*stream)(const at::Tensor& like);  // current stream of like's device (nullptr on CPU)
  const char* (*error_string)(int code);
  int (*residual_norm)(const anyflow_residual_norm_args*, void* stream);
  int (*apply_rope)(const anyflow_rope_args*, void* stream);
  int (*qk_norm_rope)(const anyflow_rope_args*, void* stream);
  int (*euler_shortcut)(const anyflow_euler_args*, void* stream);
  int (*segmented_attention)(const anyflow_attention_args*, void* stream);
  int (*chunk_causal_attention)(const anyflow_attention_args*, const int64_t* layout, int64_t layout_len, void* stream);
};

using OptTensor = std::optional<at::Tensor>;

at::Tensor adaln_modulate(const Backend& be, const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                          at::IntArrayRef segments, double eps);
at::Tensor gated_residual(const Backend& be, const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                          at::IntArrayRef segments);
std::tuple<at::Tensor, at::Tensor> residual_norm(const Backend& be, const at::Tensor& x, const at::Tensor& y,
                                                 const OptTensor& gate, at::IntArrayRef segments, double eps,
                                                 const OptTensor& shift, const OptTensor& scale, const OptTensor& weight,
                                                 const OptTensor& bias);
at::Tensor qk_norm_rope(const Backend& be, const at::Tensor& x, const at::Tensor& weight, double eps,
                        const at::Tensor& cos, const at::Tensor& sin, int64_t heads);
at::Tensor apply_rope(const Backend& be, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor euler_shortcut(const Backend& be, const at::Tensor& latents, const at::Tensor& velocity, const at::Tensor& dt,
                          double guidance_scale, int64_t num_context_frames);
void euler_shortcut_out(const Backend& be, const at::Tensor& latents, const at::Tensor& velocity, const at::Tensor& dt,
                        double guidance_scale, int64_t num_context_frames, const at::Tensor& out);
std::tuple<at::Tensor, at::Tensor> segmented_attention(const Backend& be, const at::Tensor& q, at::TensorList keys,
                                                       at::TensorList values, double scale, bool return_lse,
                                                       int64_t impl);
std::tuple<at::Tensor, at::Tensor> chunk_causal_attention(const Backend& be, const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, at::IntArrayRef layout, double scale,
                                                          bool return_lse, int64_t impl);

// Registers every c_* op of csrc/bindings.cpp for one dispatch key (B: a Backend with static storage).
template <const Backend& B>
void register_backend(torch::Library& m) {
  m.impl("c_adaln_modulate", [](const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                                at::IntArrayRef segments, double eps) {
    return adaln_modulate(B, x, shift, scale, segments, eps);
  });
  m.impl("c_gated_residual", [](const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                                at::IntArrayRef segments) { return gated_residual(B, x, y, gate, segments); });
  m.impl("c_residual_norm", [](const at::Tensor& x, const at::Tensor& y, const OptTensor& gate,
                               at::IntArrayRef segments, double eps, const OptTensor& shift, const OptTensor& scale,
                               const OptTensor& weight, const OptTensor& bias) {
    return residual_norm(B, x, y, gate, segments, eps, shift, scale, weight, bias);
  });
  m.impl("c_qk_norm_rope", [](const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& cos,
                              const at::Tensor& sin, int64_t heads) {
    return qk_norm_rope(B, x, weight, eps, cos, sin, heads);
  });
  m.impl("c_apply_rope",
         [](const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) { return apply_rope(B, x, cos, sin); });
  m.impl("c_euler_shortcut", [](const at::Tensor& latents, const at::Tensor& velocity, const at::Tensor& dt,
                                double guidance_scale, int64_t num_context_frames) {
    return euler_shortcut(B, latents, velocity, dt, guidance_scale, num_context_frames);
  });
  m.impl("c_euler_shortcut_out", [](const at::Tensor& latents, const at::Tensor& velocity, const at::Tensor& dt,
                                    double guidance_scale, int64_t num_context_frames, const at::Tensor& out) {
    euler_shortcut_out(B, latents, velocity, dt, guidance_scale, num_context_frames, out);
  });
  m.impl("c_segmented_attention", [](const at::Tensor& q, at::TensorList keys, at::TensorList values, double scale,
                                     bool return_lse, int64_t impl) {
    return segmented_attention(B, q, keys, values, scale, return_lse, impl);
  });
  m.impl("c_chunk_causal_attention", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        at::IntArrayRef layout, double scale, bool return_lse, int64_t impl) {
    return chunk_causal_attention(B, q, k, v, layout, scale, return_lse, impl);
  });
}

}  // namespace anyflow
