// Bodies of the anyflow::c_* ops (see ops.h): argument checks, outputs, launcher argument structs.
//
// Every check names the op and the argument and says what was expected and what came. Shape and
// layout problems raise ValueError, dtype problems TypeError, and limits of the kernels (segments,
// groups, head dim) NotImplementedError, so that a caller can tell "wrong call" from "use another
// backend".
#include "ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

namespace anyflow {
namespace {

struct Ctx {
  const Backend& be;
  const char* op;
  at::Device device;
};

std::string str(at::IntArrayRef a) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < a.size(); ++i) s << (i ? ", " : "") << a[i];
  s << "]";
  return s.str();
}

anyflow_dtype to_dtype(const Ctx& c, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ANYFLOW_DTYPE_F32;
    case at::kBFloat16:
      return ANYFLOW_DTYPE_BF16;
    case at::kHalf:
      return ANYFLOW_DTYPE_F16;
    default:
      TORCH_CHECK_TYPE(false, c.op, ": ", name, " must have dtype float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return ANYFLOW_DTYPE_F32;
}

// Defined, on the op's device, with `ndim` dimensions; returns its dtype.
anyflow_dtype check_tensor(const Ctx& c, const char* name, const at::Tensor& t, int64_t ndim, const char* layout) {
  TORCH_CHECK_VALUE(t.defined(), c.op, ": ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.dim() == ndim, c.op, ": ", name, " must be ", layout, " (", ndim, "-D), got shape ",
                    str(t.sizes()));
  TORCH_CHECK_VALUE(t.device() == c.device, c.op, ": ", name, " must be on ", c.device, " like the first input, got ",
                    t.device());
  TORCH_CHECK_VALUE(t.device().type() == c.be.device_type, c.op, ": the ", c.be.name, " implementation got ", name,
                    " on ", t.device());
  return to_dtype(c, name, t);
}

void check_shape(const Ctx& c, const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK_VALUE(t.sizes() == expected, c.op, ": ", name, " must be ", layout, " = ", str(expected), ", got ",
                    str(t.sizes()));
}

void check_unit_last_stride(const Ctx& c, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, c.op, ": ", name,
                    " must have unit stride along its last dimension, got strides ", str(t.strides()),
                    " (call .contiguous())");
}

void check_contiguous(const Ctx& c, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), c.op, ": ", name, " must be contiguous, got shape ", str(t.sizes()),
                    " with strides ", str(t.strides()), " (call .contiguous())");
}

void check_same_dtype(const Ctx& c, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), c.op, ": ", name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
}

void check_rc(const Ctx& c, int rc) {
  TORCH_CHECK_NOT_IMPLEMENTED(rc != ANYFLOW_ERROR_UNSUPPORTED, c.op, ": unsupported by the ", c.be.name,
                              " kernels: ", c.be.error_string(rc));
  TORCH_CHECK(rc == ANYFLOW_SUCCESS, c.op, ": ", c.be.name, " kernel failed: ", c.be.error_string(rc), " (code ", rc,
              ")");
}

// The (frames, tokens_per_frame) table flattened by the Python layer, checked against tokens and rows.
anyflow_segment_table segment_table(const Ctx& c, at::IntArrayRef segments, int64_t tokens, int64_t rows) {
  TORCH_CHECK_VALUE(segments.size() % 2 == 0, c.op, ": segments must be flat (frames, tokens_per_frame) pairs, got ",
                    segments.size(), " values");
  int64_t total_tokens = 0, total_rows = 0;
  int64_t non_empty = 0;
  for (size_t i = 0; i < segments.size(); i += 2) {
    TORCH_CHECK_VALUE(segments[i] >= 0 && segments[i + 1] > 0, c.op,
                      ": segments need frames >= 0 and tokens_per_frame > 0, got ", str(segments));
    total_tokens += segments[i] * segments[i + 1];
    total_rows += segments[i];
    non_empty += segments[i] > 0;
  }
  TORCH_CHECK_VALUE(total_tokens == tokens, c.op, ": segments ", str(segments), " cover ", total_tokens,
                    " tokens but the input has ", tokens);
  if (rows >= 0) {
    TORCH_CHECK_VALUE(total_rows == rows, c.op, ": segments ", str(segments), " cover ", total_rows,
                      " frames but the modulation has ", rows, " rows");
  }
  TORCH_CHECK_NOT_IMPLEMENTED(non_empty <= ANYFLOW_MAX_SEGMENTS, c.op, ": at most ", ANYFLOW_MAX_SEGMENTS,
                              " non-empty segments are supported, got ", non_empty, " in ", str(segments));
  anyflow_segment_table t;
  const int rc = anyflow_segment_table_init(&t, segments.data(), static_cast<int64_t>(segments.size() / 2), tokens,
                                            total_rows);
  check_rc(c, rc);
  return t;
}

// Per-frame [B, R, d] tensor: shape, unit last stride; returns its dtype.
anyflow_dtype check_per_frame(const Ctx& c, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t rows) {
  const anyflow_dtype dt = check_tensor(c, name, t, 3, "[B, R, d]");
  TORCH_CHECK_VALUE(t.size(0) == x.size(0) && t.size(2) == x.size(2) && (rows < 0 || t.size(1) == rows), c.op, ": ",
                    name, " must be [B, R, d] = [", x.size(0), ", ", rows < 0 ? std::string("R") : std::to_string(rows),
                    ", ", x.size(2), "], got ", str(t.sizes()));
  check_unit_last_stride(c, name, t);
  return dt;
}

void* data(const at::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }
const void* cdata(const at::Tensor& t) { return t.numel() ? t.const_data_ptr() : nullptr; }

// Shared body of adaln_modulate / gated_residual / residual_norm.
std::tuple<at::Tensor, at::Tensor> run_residual_norm(const Ctx& c, const at::Tensor& x, const at::Tensor* y,
                                                     const at::Tensor* gate, at::IntArrayRef segments, double eps,
                                                     const at::Tensor* shift, const at::Tensor* scale,
                                                     const at::Tensor* weight, const at::Tensor* bias, bool want_x,
                                                     bool want_h) {
  anyflow_residual_norm_args a = {};
  a.dtype = check_tensor(c, "x", x, 3, "[B, N, d]");
  check_unit_last_stride(c, "x", x);
  a.batch = x.size(0);
  a.tokens = x.size(1);
  a.dim = x.size(2);
  a.x = cdata(x);
  a.x_stride_b = x.stride(0);
  a.x_stride_n = x.stride(1);
  if (y != nullptr) {
    check_tensor(c, "y", *y, 3, "[B, N, d]");
    check_shape(c, "y", *y, x.sizes(), "the shape of x");
    check_same_dtype(c, "y", *y, "x", x);
    check_unit_last_stride(c, "y", *y);
    a.y = cdata(*y);
    a.y_stride_b = y->stride(0);
    a.y_stride_n = y->stride(1);
  }
  int64_t rows = -1;
  if (gate != nullptr) {
    a.gate_dtype = check_per_frame(c, "gate", *gate, x, -1);
    rows = gate->size(1);
    a.gate = cdata(*gate);
    a.gate_stride_b = gate->stride(0);
    a.gate_stride_r = gate->stride(1);
  }
  TORCH_CHECK_VALUE((shift == nullptr) == (scale == nullptr), c.op, ": shift and scale must be given together");
  if (shift != nullptr) {
    TORCH_CHECK_VALUE(weight == nullptr && bias == nullptr, c.op,
                      ": give either shift/scale (adaLN) or weight/bias (affine LayerNorm), not both");
    a.shift_dtype = check_per_frame(c, "shift", *shift, x, rows);
    rows = shift->size(1);
    a.scale_dtype = check_per_frame(c, "scale", *scale, x, rows);
    a.norm = ANYFLOW_NORM_MODULATE;
    a.shift = cdata(*shift);
    a.scale = cdata(*scale);
    a.shift_stride_b = shift->stride(0);
    a.shift_stride_r = shift->stride(1);
    a.scale_stride_b = scale->stride(0);
    a.scale_stride_r = scale->stride(1);
  } else if (want_h) {
    a.norm = ANYFLOW_NORM_AFFINE;
    const at::Tensor* params[2] = {weight, bias};
    const char* names[2] = {"weight", "bias"};
    for (int i = 0; i < 2; ++i) {
      if (params[i] == nullptr) continue;
      const anyflow_dtype dt = check_tensor(c, names[i], *params[i], 1, "[d]");
      check_shape(c, names[i], *params[i], {x.size(2)}, "[d]");
      check_contiguous(c, names[i], *params[i]);
      (i == 0 ? a.weight_dtype : a.bias_dtype) = dt;
      (i == 0 ? a.weight : a.bias) = cdata(*params[i]);
    }
  }
  a.segments = segment_table(c, segments, a.tokens, rows);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, c.op, ": eps must be a finite number >= 0, got ", eps);
  a.eps = static_cast<float>(eps);

  const c10::DeviceGuard guard(x.device());
  at::Tensor x_out = want_x ? at::empty(x.sizes(), x.options()) : at::Tensor();
  at::Tensor h_out = want_h ? at::empty(x.sizes(), x.options()) : at::Tensor();
  a.x_out = want_x ? data(x_out) : nullptr;
  a.h_out = want_h ? data(h_out) : nullptr;
  if (x.numel() == 0) return {x_out, h_out};
  check_rc(c, c.be.residual_norm(&a, c.be.stream(x)));
  return {x_out, h_out};
}

anyflow_rope_args rope_tables(const Ctx& c, const at::Tensor& cos, const at::Tensor& sin, int64_t tokens, int64_t half) {
  anyflow_rope_args a = {};
  const at::Tensor* tabs[2] = {&cos, &sin};
  const char* names[2] = {"cos", "sin"};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_TYPE(tabs[i]->scalar_type() == at::kFloat, c.op, ": ", names[i], " must be float32, got ",
                     tabs[i]->scalar_type());
    check_tensor(c, names[i], *tabs[i], 2, "[L, Dh/2]");
    check_shape(c, names[i], *tabs[i], {tokens, half}, "[L, Dh/2]");
    check_contiguous(c, names[i], *tabs[i]);
  }
  a.cos = cos.numel() ? cos.const_data_ptr<float>() : nullptr;
  a.sin = sin.numel() ? sin.const_data_ptr<float>() : nullptr;
  return a;
}

anyflow_euler_args euler_args(const Ctx& c, const at::Tensor& latents, const at::Tensor& velocity, const at::Tensor& dt,
                              double guidance_scale, int64_t num_context_frames) {
  TORCH_CHECK_VALUE(latents.defined() && latents.dim() >= 2, c.op,
                    ": latents must be [B, F, ...] (at least 2-D), got shape ",
                    latents.defined() ? str(latents.sizes()) : std::string("undefined"));
  anyflow_euler_args a = {};
  a.latents_dtype = check_tensor(c, "latents", latents, latents.dim(), "[B, F, ...]");
  a.velocity_dtype = check_tensor(c, "velocity", velocity, latents.dim(), "[B or 2B, F, ...]");
  const int64_t b = latents.size(0), f = latents.size(1);
  TORCH_CHECK_VALUE(velocity.sizes().slice(1) == latents.sizes().slice(1) &&
                        (velocity.size(0) == b || velocity.size(0) == 2 * b),
                    c.op, ": velocity must be [B or 2B, F, ...] with latents ", str(latents.sizes()), ", got ",
                    str(velocity.sizes()));
  TORCH_CHECK_TYPE(dt.scalar_type() == at::kFloat, c.op, ": dt must be float32, got ", dt.scalar_type());
  check_tensor(c, "dt", dt, 2, "[B, F]");
  check_shape(c, "dt", dt, {b, f}, "[B, F]");
  check_contiguous(c, "latents", latents);
  check_contiguous(c, "velocity", velocity);
  check_contiguous(c, "dt", dt);
  TORCH_CHECK_VALUE(num_context_frames >= 0 && num_context_frames <= f, c.op, ": num_context_frames must be in [0, ", f,
                    "], got ", num_context_frames);
  TORCH_CHECK_VALUE(std::isfinite(guidance_scale), c.op, ": guidance_scale must be finite, got ", guidance_scale);
  a.latents = cdata(latents);
  a.velocity = cdata(velocity);
  a.dt = dt.numel() ? dt.const_data_ptr<float>() : nullptr;
  a.batch = b;
  a.outer = 1;
  a.frames = f;
  a.inner = b * f != 0 ? latents.numel() / (b * f) : 0;
  a.cfg = velocity.size(0) == 2 * b && b > 0 ? 1 : 0;
  a.guidance_scale = static_cast<float>(guidance_scale);
  a.num_context_frames = num_context_frames;
  return a;
}

void check_attention_tensor(const Ctx& c, const char* name, const at::Tensor& t, const at::Tensor& q) {
  check_tensor(c, name, t, 4, "[B, H, L, D]");
  TORCH_CHECK_VALUE(t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(3) == q.size(3), c.op, ": ", name,
                    " must be [B, H, L, D] = [", q.size(0), ", ", q.size(1), ", L, ", q.size(3), "] like q, got ",
                    str(t.sizes()));
  check_same_dtype(c, name, t, "q", q);
  check_unit_last_stride(c, name, t);
}

// q checks, output allocation and the q/out/lse part of the launcher arguments.
anyflow_attention_args attention_args(const Ctx& c, const at::Tensor& q, double scale, bool return_lse, int64_t impl,
                                      at::Tensor& out, at::Tensor& lse) {
  anyflow_attention_args a = {};
  a.dtype = check_tensor(c, "q", q, 4, "[B, H, Lq, D]");
  check_unit_last_stride(c, "q", q);
  TORCH_CHECK_NOT_IMPLEMENTED(q.size(3) >= 1 && q.size(3) <= ANYFLOW_ATTN_MAX_HEAD_DIM, c.op,
                              ": head dim must be in [1, ", ANYFLOW_ATTN_MAX_HEAD_DIM, "], got ", q.size(3));
  TORCH_CHECK_VALUE(std::isfinite(scale), c.op, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(impl >= ANYFLOW_ATTN_AUTO && impl <= ANYFLOW_ATTN_MMA, c.op,
                    ": impl must be 0 (auto), 1 (SIMT) or 2 (tensor cores), got ", impl);
  a.batch = q.size(0);
  a.heads = q.size(1);
  a.q_len = q.size(2);
  a.head_dim = q.size(3);
  a.q = cdata(q);
  a.q_stride_b = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.q_stride_l = q.stride(2);
  a.scale = static_cast<float>(scale);
  a.impl = static_cast<anyflow_attn_impl>(impl);
  out = at::empty_like(q);  // q's layout when it is dense (e.g. a [B, L, H, D] buffer seen as [B, H, L, D])
  lse = return_lse ? at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat))
                   : at::empty({0}, q.options().dtype(at::kFloat));
  a.out = data(out);
  a.out_stride_b = out.stride(0);
  a.out_stride_h = out.stride(1);
  a.out_stride_l = out.stride(2);
  a.lse = return_lse && lse.numel() ? lse.data_ptr<float>() : nullptr;
  return a;
}

anyflow_kv_segment kv_segment(const at::Tensor& k, const at::Tensor& v) {
  anyflow_kv_segment s = {};
  s.k = cdata(k);
  s.v = cdata(v);
  s.k_stride_b = k.stride(0);
  s.k_stride_h = k.stride(1);
  s.k_stride_l = k.stride(2);
  s.v_stride_b = v.stride(0);
  s.v_stride_h = v.stride(1);
  s.v_stride_l = v.stride(2);
  s.len = k.size(2);
  return s;
}

}  // namespace

at::Tensor adaln_modulate(const Backend& be, const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                          at::IntArrayRef segments, double eps) {
  const Ctx c{be, "anyflow::c_adaln_modulate", x.device()};
  return std::get<1>(
      run_residual_norm(c, x, nullptr, nullptr, segments, eps, &shift, &scale, nullptr, nullptr, false, true));
}

at::Tensor gated_residual(const Backend& be, const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                          at::IntArrayRef segments) {
  const Ctx c{be, "anyflow::c_gated_residual", x.device()};
  return std::get<0>(run_residual_norm(c, x, &y, &gate, segments, 0.0, nullptr, nullptr, nullptr, nullptr, true, false));
}

std::tuple<at::Tensor, at::Tensor> residual_norm(const Backend& be, const at::Tensor& x, const at::Tensor& y,
                                                 const OptTensor& gate, at::IntArrayRef segments, double eps,
                                                 const OptTensor& shift, const OptTensor& scale, const OptTensor& weight,
                                                 const OptTensor& bias) {
  const Ctx c{be, "anyflow::c_residual_norm", x.device()};
  auto ptr = [](const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; };
  return run_residual_norm(c, x, &y, ptr(gate), segments, eps, ptr(shift), ptr(scale), ptr(weight), ptr(bias), true,
                           true);
}

at::Tensor qk_norm_rope(const Backend& be, const at::Tensor& x, const at::Tensor& weight, double eps,
                        const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  const Ctx c{be, "anyflow::c_qk_norm_rope", x.device()};
  const anyflow_dtype dtype = check_tensor(c, "x", x, 3, "[B, L, H*Dh]");
  check_unit_last_stride(c, "x", x);
  TORCH_CHECK_VALUE(heads > 0 && x.size(2) % heads == 0, c.op, ": heads must divide the channels of x ",
                    str(x.sizes()), ", got heads=", heads);
  const int64_t dh = x.size(2) / heads;
  TORCH_CHECK_VALUE(dh % 2 == 0, c.op, ": the head dim x.shape[2] / heads must be even, got ", dh);
  const anyflow_dtype wdt = check_tensor(c, "weight", weight, 1, "[H*Dh]");
  check_shape(c, "weight", weight, {x.size(2)}, "[H*Dh]");
  check_contiguous(c, "weight", weight);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, c.op, ": eps must be a finite number >= 0, got ", eps);
  anyflow_rope_args a = rope_tables(c, cos, sin, x.size(1), dh / 2);
  a.dtype = dtype;
  a.batch = x.size(0);
  a.tokens = x.size(1);
  a.heads = heads;
  a.head_dim = dh;
  a.x = cdata(x);
  a.x_stride_b = x.stride(0);
  a.x_stride_l = x.stride(1);
  a.x_stride_h = dh;
  a.weight = cdata(weight);
  a.weight_dtype = wdt;
  a.eps = static_cast<float>(eps);
  const c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), x.size(1), heads, dh}, x.options());
  a.out = data(out);
  if (out.numel() == 0) return out;
  check_rc(c, be.qk_norm_rope(&a, be.stream(x)));
  return out;
}

at::Tensor apply_rope(const Backend& be, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const Ctx c{be, "anyflow::c_apply_rope", x.device()};
  const anyflow_dtype dtype = check_tensor(c, "x", x, 4, "[B, L, H, D]");
  check_unit_last_stride(c, "x", x);
  TORCH_CHECK_VALUE(x.size(3) % 2 == 0, c.op, ": the head dim of x must be even, got shape ", str(x.sizes()));
  anyflow_rope_args a = rope_tables(c, cos, sin, x.size(1), x.size(3) / 2);
  a.dtype = dtype;
  a.batch = x.size(0);
  a.tokens = x.size(1);
  a.heads = x.size(2);
  a.head_dim = x.size(3);
  a.x = cdata(x);
  a.x_stride_b = x.stride(0);
  a.x_stride_l = x.stride(1);
  a.x_stride_h = x.stride(2);
  a.weight_dtype = ANYFLOW_DTYPE_F32;
  const c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  a.out = data(out);
  if (out.numel() == 0) return out;
  check_rc(c, be.apply_rope(&a, be.stream(x)));
  return out;
}

at::Tensor euler_shortcut(const Backend& be, const at::Tensor& latents, const at::Tensor& velocity, const at::Tensor& dt,
                          double guidance_scale, int64_t num_context_frames) {
  const Ctx c{be, "anyflow::c_euler_shortcut", latents.device()};
  anyflow_euler_args a = euler_args(c, latents, velocity, dt, guidance_scale, num_context_frames);
  const c10::DeviceGuard guard(latents.device());
  at::Tensor out = at::empty(latents.sizes(), latents.options());
  a.out = data(out);
  if (out.numel() == 0) return out;
  check_rc(c, be.euler_shortcut(&a, be.stream(latents)));
  return out;
}

void euler_shortcut_out(const Backend& be, const at::Tensor& latents, const at::Tensor& velocity, const at::Tensor& dt,
                        double guidance_scale, int64_t num_context_frames, const at::Tensor& out) {
  const Ctx c{be, "anyflow::c_euler_shortcut_out", latents.device()};
  anyflow_euler_args a = euler_args(c, latents, velocity, dt, guidance_scale, num_context_frames);
  check_tensor(c, "out", out, latents.dim(), "[B, F, ...] like latents");
  check_shape(c, "out", out, latents.sizes(), "the shape of latents");
  check_same_dtype(c, "out", out, "latents", latents);
  check_contiguous(c, "out", out);
  a.out = data(out);
  if (out.numel() == 0) return;
  const c10::DeviceGuard guard(latents.device());
  check_rc(c, be.euler_shortcut(&a, be.stream(latents)));
}

std::tuple<at::Tensor, at::Tensor> segmented_attention(const Backend& be, const at::Tensor& q, at::TensorList keys,
                                                       at::TensorList values, double scale, bool return_lse,
                                                       int64_t impl) {
  const Ctx c{be, "anyflow::c_segmented_attention", q.device()};
  TORCH_CHECK_VALUE(!keys.empty() && keys.size() == values.size(), c.op,
                    ": keys and values must be non-empty lists of equal length, got ", keys.size(), " and ",
                    values.size());
  check_tensor(c, "q", q, 4, "[B, H, Lq, D]");
  int64_t total = 0;
  std::vector<anyflow_kv_segment> segs;
  for (size_t i = 0; i < keys.size(); ++i) {
    const std::string kn = "keys[" + std::to_string(i) + "]", vn = "values[" + std::to_string(i) + "]";
    check_attention_tensor(c, kn.c_str(), keys[i], q);
    check_attention_tensor(c, vn.c_str(), values[i], q);
    check_shape(c, vn.c_str(), values[i], keys[i].sizes(), "the shape of its keys");
    total += keys[i].size(2);
    if (keys[i].size(2) > 0) segs.push_back(kv_segment(keys[i], values[i]));
  }
  TORCH_CHECK_VALUE(total > 0, c.op, ": needs at least one key, got ", keys.size(), " empty segments");
  TORCH_CHECK_NOT_IMPLEMENTED(segs.size() <= ANYFLOW_ATTN_MAX_SEGMENTS, c.op, ": at most ", ANYFLOW_ATTN_MAX_SEGMENTS,
                              " non-empty KV segments are supported, got ", segs.size());
  at::Tensor out, lse;
  const c10::DeviceGuard guard(q.device());
  anyflow_attention_args a = attention_args(c, q, scale, return_lse, impl, out, lse);
  a.num_segments = static_cast<int32_t>(segs.size());
  for (size_t i = 0; i < segs.size(); ++i) a.segments[i] = segs[i];
  if (out.numel() == 0) return {out, lse};
  check_rc(c, be.segmented_attention(&a, be.stream(q)));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> chunk_causal_attention(const Backend& be, const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, at::IntArrayRef layout, double scale,
                                                          bool return_lse, int64_t impl) {
  const Ctx c{be, "anyflow::c_chunk_causal_attention", q.device()};
  check_tensor(c, "q", q, 4, "[B, H, Lq, D]");
  check_attention_tensor(c, "k", k, q);
  check_attention_tensor(c, "v", v, q);
  check_shape(c, "v", v, k.sizes(), "the shape of k");
  // Validate the layout on the host with the plan builder the kernels use (block size is irrelevant here).
  anyflow_attn_plan plan;
  const int rc = anyflow_attn_plan_layout(&plan, layout.data(), static_cast<int64_t>(layout.size()), q.size(2),
                                          k.size(2), 64);
  TORCH_CHECK_NOT_IMPLEMENTED(rc != ANYFLOW_ERROR_UNSUPPORTED, c.op, ": the layout needs at most ",
                              ANYFLOW_ATTN_MAX_GROUPS, " query groups and ", ANYFLOW_ATTN_MAX_RANGES,
                              " non-empty key ranges per group (and fewer than 2^31 tokens)");
  TORCH_CHECK_VALUE(rc == ANYFLOW_SUCCESS, c.op,
                    ": layout must be flat groups (q_start, q_end, n, k_start_1, k_end_1, ..., k_start_n, k_end_n) "
                    "whose query ranges tile [0, ",
                    q.size(2), ") and whose n >= 1 key ranges lie in [0, ", k.size(2), "], got ", layout.size(),
                    " values");
  at::Tensor out, lse;
  const c10::DeviceGuard guard(q.device());
  anyflow_attention_args a = attention_args(c, q, scale, return_lse, impl, out, lse);
  a.num_segments = 1;
  a.segments[0] = kv_segment(k, v);
  if (out.numel() == 0) return {out, lse};
  check_rc(c, be.chunk_causal_attention(&a, layout.data(), static_cast<int64_t>(layout.size()), be.stream(q)));
  return {out, lse};
}

}  // namespace anyflow
