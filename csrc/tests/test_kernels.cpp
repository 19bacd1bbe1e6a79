// Tests of the CUDA launchers (registered with ctest by CMakeLists.txt).
//
// Without a GPU: every launcher rejects bad arguments with the right code on the host, accepts empty
// work without touching the device, and reports a CUDA error (not success) for a real launch.
// With a GPU: every kernel against a double-precision host reference, fp32 and bf16, including both
// attention paths (SIMT and tensor cores) on segmented and chunk-causal calls.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention.h"
#include "conditioning.h"
#include "euler_shortcut.h"
#include "rope.h"
#include "test_util.h"

using test::check;

namespace {

int dummy_storage[64];
void* const P = dummy_storage;  // a non-null pointer for host-side validation (never dereferenced)

anyflow_residual_norm_args valid_residual_norm() {
  anyflow_residual_norm_args a = {};
  a.dtype = ANYFLOW_DTYPE_F32;
  a.batch = 1;
  a.tokens = 3;
  a.dim = 8;
  a.x = a.y = a.gate = P;
  a.x_stride_b = 24;
  a.x_stride_n = 8;
  a.y_stride_b = 24;
  a.y_stride_n = 8;
  a.norm = ANYFLOW_NORM_MODULATE;
  a.shift = a.scale = P;
  a.eps = 1e-6f;
  const int64_t pairs[] = {1, 3};
  anyflow_segment_table_init(&a.segments, pairs, 1, 3, 1);
  a.x_out = a.h_out = P;
  return a;
}

anyflow_rope_args valid_rope() {
  anyflow_rope_args a = {};
  a.dtype = ANYFLOW_DTYPE_BF16;
  a.batch = 1;
  a.tokens = 2;
  a.heads = 2;
  a.head_dim = 4;
  a.out = P;
  a.x = a.weight = P;
  a.cos = a.sin = static_cast<const float*>(P);
  a.x_stride_b = 16;
  a.x_stride_l = 8;
  a.x_stride_h = 4;
  a.eps = 1e-6f;
  return a;
}

anyflow_euler_args valid_euler() {
  anyflow_euler_args a = {};
  a.out = P;
  a.latents = a.velocity = P;
  a.dt = static_cast<const float*>(P);
  a.batch = 1;
  a.outer = 1;
  a.frames = 2;
  a.inner = 3;
  a.velocity_dtype = ANYFLOW_DTYPE_BF16;
  return a;
}

anyflow_attention_args valid_attention() {
  anyflow_attention_args a = {};
  a.dtype = ANYFLOW_DTYPE_BF16;
  a.batch = 1;
  a.heads = 1;
  a.q_len = 4;
  a.head_dim = 64;
  a.q = a.out = P;
  a.num_segments = 1;
  a.segments[0].k = a.segments[0].v = P;
  a.segments[0].len = 4;
  a.scale = 0.125f;
  return a;
}

void test_validation() {
  const int INV = ANYFLOW_ERROR_INVALID_ARGUMENT, UNS = ANYFLOW_ERROR_UNSUPPORTED;
  {
    auto a = valid_residual_norm();
    check(anyflow_residual_norm_check(&a) == ANYFLOW_SUCCESS, "residual_norm: valid arguments pass the check");
    a.batch = -1;
    check(anyflow_residual_norm(&a, nullptr) == INV, "residual_norm: negative batch");
    a = valid_residual_norm();
    a.dtype = static_cast<anyflow_dtype>(7);
    check(anyflow_residual_norm(&a, nullptr) == INV, "residual_norm: unknown dtype");
    a = valid_residual_norm();
    a.scale = nullptr;
    check(anyflow_residual_norm(&a, nullptr) == INV, "residual_norm: MODULATE without scale");
    a = valid_residual_norm();
    a.h_out = nullptr;
    check(anyflow_residual_norm(&a, nullptr) == INV, "residual_norm: norm without h_out");
    a = valid_residual_norm();
    a.y = nullptr;
    check(anyflow_residual_norm(&a, nullptr) == INV, "residual_norm: gate/x_out without y");
    a = valid_residual_norm();
    a.segments.num_tokens = 4;
    check(anyflow_residual_norm(&a, nullptr) == INV, "residual_norm: segment table of another length");
    a = valid_residual_norm();
    a.norm = static_cast<anyflow_norm_mode>(5);
    check(anyflow_residual_norm(&a, nullptr) == INV, "residual_norm: unknown norm mode");
    a = valid_residual_norm();
    a.weight = P;
    check(anyflow_residual_norm(&a, nullptr) == INV, "residual_norm: weight with MODULATE");
    a = valid_residual_norm();
    a.tokens = 0;
    a.segments.num_tokens = 0;
    check(anyflow_residual_norm(&a, nullptr) == ANYFLOW_SUCCESS, "residual_norm: empty input is a no-op");
    // Row limits (rejected before any launch): 4096 chunks of 16 bytes, or of 1 element when the
    // vector width does not divide dim (the limits anyflow/ops/_cuda.py's _row_limit mirrors).
    a = valid_residual_norm();
    a.dtype = ANYFLOW_DTYPE_BF16;
    a.x_stride_b = a.y_stride_b = 32776 * 3;
    a.x_stride_n = a.y_stride_n = a.dim = 32776;
    check(anyflow_residual_norm(&a, nullptr) == UNS, "residual_norm: 32776 bf16 channels are too wide");
    a.x_stride_b = a.y_stride_b = 4097 * 3;
    a.x_stride_n = a.y_stride_n = a.dim = 4097;
    check(anyflow_residual_norm(&a, nullptr) == UNS, "residual_norm: 4097 bf16 channels (not a multiple of 8)");
  }
  {
    auto a = valid_rope();
    check(anyflow_rope_check(&a, true) == ANYFLOW_SUCCESS, "rope: valid arguments pass the check");
    a.head_dim = 5;
    check(anyflow_apply_rope(&a, nullptr) == INV, "apply_rope: odd head_dim");
    a = valid_rope();
    a.cos = nullptr;
    check(anyflow_apply_rope(&a, nullptr) == INV, "apply_rope: null cos");
    a = valid_rope();
    a.x_stride_h = 8;
    check(anyflow_qk_norm_rope(&a, nullptr) == INV, "qk_norm_rope: channels must be contiguous across heads");
    a = valid_rope();
    a.weight = nullptr;
    check(anyflow_qk_norm_rope(&a, nullptr) == INV, "qk_norm_rope: null weight");
    a = valid_rope();
    a.tokens = 0;
    check(anyflow_qk_norm_rope(&a, nullptr) == ANYFLOW_SUCCESS, "qk_norm_rope: empty input is a no-op");
    a = valid_rope();  // head_dim 6 (bf16 pairs): at most 8192 channels
    a.head_dim = a.x_stride_h = 6;
    a.heads = 1366;
    a.x_stride_l = 6 * 1366;
    a.x_stride_b = 2 * a.x_stride_l;
    check(anyflow_qk_norm_rope(&a, nullptr) == UNS, "qk_norm_rope: 8196 channels of head dim 6 are too wide");
  }
  {
    auto a = valid_euler();
    check(anyflow_euler_check(&a) == ANYFLOW_SUCCESS, "euler: valid arguments pass the check");
    a.num_context_frames = 3;
    check(anyflow_euler_shortcut(&a, nullptr) == INV, "euler: more context frames than frames");
    a = valid_euler();
    a.cfg = 2;
    check(anyflow_euler_shortcut(&a, nullptr) == INV, "euler: cfg must be 0 or 1");
    a = valid_euler();
    a.dt = nullptr;
    check(anyflow_euler_shortcut(&a, nullptr) == INV, "euler: null dt");
    a = valid_euler();
    a.inner = 0;
    a.out = nullptr;
    check(anyflow_euler_shortcut(&a, nullptr) == ANYFLOW_SUCCESS, "euler: empty input is a no-op");
  }
  {
    auto a = valid_attention();
    check(anyflow_attention_check(&a) == ANYFLOW_SUCCESS, "attention: valid arguments pass the check");
    a.head_dim = 264;
    check(anyflow_segmented_attention(&a, nullptr) == UNS, "attention: head_dim 264 unsupported");
    a = valid_attention();
    a.num_segments = 5;
    check(anyflow_segmented_attention(&a, nullptr) == UNS, "attention: 5 segments unsupported");
    a = valid_attention();
    a.segments[0].k = nullptr;
    check(anyflow_segmented_attention(&a, nullptr) == INV, "attention: null keys");
    a = valid_attention();
    a.impl = ANYFLOW_ATTN_MMA;
    a.dtype = ANYFLOW_DTYPE_F32;
    check(anyflow_segmented_attention(&a, nullptr) == UNS, "attention: tensor-core path needs bf16/fp16");
    a = valid_attention();
    a.impl = ANYFLOW_ATTN_MMA;
    a.q_stride_l = 65;  // rows not 16-byte aligned
    check(anyflow_segmented_attention(&a, nullptr) == UNS, "attention: tensor-core path needs aligned rows");
    a = valid_attention();
    const int64_t gap[] = {0, 2, 1, 0, 4, 3, 4, 1, 0, 4};
    check(anyflow_chunk_causal_attention(&a, gap, 10, nullptr) == INV, "chunk-causal: groups must tile the queries");
    const int64_t ok_layout[] = {0, 4, 1, 0, 4};
    a.num_segments = 2;
    check(anyflow_chunk_causal_attention(&a, ok_layout, 5, nullptr) == INV, "chunk-causal: exactly one KV segment");
    a = valid_attention();
    a.q_len = 0;
    check(anyflow_chunk_causal_attention(&a, nullptr, 0, nullptr) == ANYFLOW_SUCCESS,
          "chunk-causal: empty input is a no-op");
  }
}

// A launch with valid arguments on a machine without a device must fail with a CUDA error code.
void test_launch_without_device() {
  float buf[64] = {};
  auto rn = valid_residual_norm();
  rn.x = rn.y = rn.gate = rn.shift = rn.scale = buf;
  rn.x_out = rn.h_out = buf;
  const int rc = anyflow_residual_norm(&rn, nullptr);
  std::printf("launch without a device returned %d (%s)\n", rc, anyflow_error_string(rc));
  check(rc > 0, "residual_norm launch without a device fails with a CUDA error");
  auto at = valid_attention();
  const int64_t layout[] = {0, 4, 1, 0, 4};
  check(anyflow_chunk_causal_attention(&at, layout, 5, nullptr) > 0, "attention launch without a device fails");
  // Wide rows that are not 16-byte aligned reach the launch (vector-width chunks, scalar accesses)
  // instead of being refused: residual_norm on 14B's 5120 channels, qk_norm_rope on 40 x 128.
  const char* odd = reinterpret_cast<const char*>(buf) + 2;  // never dereferenced without a device
  for (anyflow_dtype dt : {ANYFLOW_DTYPE_F32, ANYFLOW_DTYPE_BF16}) {
    rn = valid_residual_norm();
    rn.dtype = dt;
    rn.x = odd;
    rn.y = rn.gate = rn.shift = rn.scale = buf;
    rn.x_out = rn.h_out = buf;
    rn.dim = rn.x_stride_n = rn.y_stride_n = 5120;
    rn.x_stride_b = rn.y_stride_b = 3 * 5120;
    check(anyflow_residual_norm(&rn, nullptr) > 0, "residual_norm: unaligned 5120-wide rows are launched");
    auto qk = valid_rope();
    qk.dtype = dt;
    qk.x = odd;
    qk.weight = qk.out = buf;
    qk.cos = qk.sin = buf;
    qk.heads = 40;
    qk.head_dim = qk.x_stride_h = 128;
    qk.x_stride_l = 5120;
    qk.x_stride_b = 2 * 5120;
    check(anyflow_qk_norm_rope(&qk, nullptr) > 0, "qk_norm_rope: unaligned 40 x 128 rows are launched");
    qk.heads = 80;
    qk.x_stride_l = 10240;
    qk.x_stride_b = 2 * 10240;
    check(anyflow_qk_norm_rope(&qk, nullptr) > 0, "qk_norm_rope: unaligned 80 x 128 rows are launched");
  }
}

// ------------------------------------------------------------------------------------------------
// GPU branch
// ------------------------------------------------------------------------------------------------
struct Dev {  // owning device buffer (movable, not copyable)
  void* p = nullptr;
  explicit Dev(size_t bytes) { cudaMalloc(&p, bytes ? bytes : 1); }
  Dev(Dev&& o) noexcept : p(o.p) { o.p = nullptr; }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  ~Dev() {
    if (p != nullptr) cudaFree(p);
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// Host tensor stored as fp32 or bf16 bits; values are rounded to the storage type at creation.
struct HostT {
  anyflow_dtype dtype;
  std::vector<float> v;  // the exact stored values
  std::vector<uint16_t> bits;
  HostT(anyflow_dtype dt, size_t n, uint64_t seed, float scale = 1.f, float shift = 0.f) : dtype(dt), v(n) {
    test::Rng rng(seed);
    for (auto& x : v) {
      x = rng.next() * scale + shift;
      if (dt == ANYFLOW_DTYPE_BF16) x = test::bf16_round(x);
    }
    if (dt == ANYFLOW_DTYPE_BF16) {
      bits.resize(n);
      for (size_t i = 0; i < n; ++i) bits[i] = test::to_bf16(v[i]);
    }
  }
  size_t bytes() const { return v.size() * (dtype == ANYFLOW_DTYPE_BF16 ? 2 : 4); }
  const void* data() const { return dtype == ANYFLOW_DTYPE_BF16 ? static_cast<const void*>(bits.data()) : v.data(); }
  Dev upload() const {
    Dev d(bytes());
    cudaMemcpy(d.p, data(), bytes(), cudaMemcpyHostToDevice);
    return d;
  }
};

std::vector<float> download(const Dev& d, anyflow_dtype dt, size_t n) {
  std::vector<float> out(n);
  if (dt == ANYFLOW_DTYPE_BF16) {
    std::vector<uint16_t> b(n);
    cudaMemcpy(b.data(), d.p, n * 2, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < n; ++i) out[i] = test::from_bf16(b[i]);
  } else {
    cudaMemcpy(out.data(), d.p, n * 4, cudaMemcpyDeviceToHost);
  }
  return out;
}

// max |got - ref| <= atol + rtol * max |ref|; NaN fails.
bool close(const std::vector<float>& got, const std::vector<double>& ref, double rtol, double atol, const char* what) {
  double err = 0.0, mag = 0.0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    finite = finite && std::isfinite(got[i]);
    err = std::max(err, std::fabs(got[i] - ref[i]));
    mag = std::max(mag, std::fabs(ref[i]));
  }
  std::printf("      %s: max error %.3g (max |ref| %.3g)\n", what, err, mag);
  return finite && err <= atol + rtol * mag;
}

double tol(anyflow_dtype dt) { return dt == ANYFLOW_DTYPE_BF16 ? 1.6e-2 : 2e-5; }

// `x_offset`: x starts that many elements into its buffer (1: not 16-byte aligned, the unaligned path).
void gpu_residual_norm(anyflow_dtype dt, anyflow_norm_mode norm, int64_t dim, int64_t x_offset = 0) {
  const int64_t B = 2, pairs[] = {2, 9, 3, 13}, N = 2 * 9 + 3 * 13, R = 5;
  HostT x(dt, B * N * dim + x_offset, 1, 2.f, 0.5f), y(dt, B * N * dim, 2),
      mod(ANYFLOW_DTYPE_F32, B * R * 3 * dim, 3, 0.5f);
  HostT w(ANYFLOW_DTYPE_F32, dim, 4, 0.5f, 1.f);
  Dev dx = x.upload(), dy = y.upload(), dm = mod.upload(), dw = w.upload();
  Dev xo(y.bytes()), ho(y.bytes());
  cudaMemset(xo.p, 0xff, y.bytes());  // NaN poison
  cudaMemset(ho.p, 0xff, y.bytes());
  anyflow_residual_norm_args a = {};
  a.dtype = dt;
  a.batch = B;
  a.tokens = N;
  a.dim = dim;
  a.x = static_cast<const char*>(dx.p) + x_offset * (dt == ANYFLOW_DTYPE_BF16 ? 2 : 4);
  a.x_stride_b = N * dim;
  a.x_stride_n = dim;
  a.y = dy.p;
  a.y_stride_b = N * dim;
  a.y_stride_n = dim;
  // modulation [B, R, 3, d]: gate, shift, scale are strided views
  a.gate = dm.as<float>() + 0 * dim;
  a.gate_dtype = ANYFLOW_DTYPE_F32;
  a.gate_stride_b = R * 3 * dim;
  a.gate_stride_r = 3 * dim;
  a.norm = norm;
  if (norm == ANYFLOW_NORM_MODULATE) {
    a.shift = dm.as<float>() + dim;
    a.scale = dm.as<float>() + 2 * dim;
    a.shift_stride_b = a.scale_stride_b = R * 3 * dim;
    a.shift_stride_r = a.scale_stride_r = 3 * dim;
  } else {
    a.weight = dw.p;
  }
  a.eps = 1e-6f;
  anyflow_segment_table_init(&a.segments, pairs, 2, N, R);
  a.x_out = xo.p;
  a.h_out = ho.p;
  const int rc = anyflow_residual_norm(&a, nullptr);
  cudaDeviceSynchronize();
  const auto gx = download(xo, dt, y.v.size()), gh = download(ho, dt, y.v.size());
  std::vector<double> rx(y.v.size()), rh(y.v.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t f = anyflow::segment_row(a.segments, n);
      const float* m = mod.v.data() + (b * R + f) * 3 * dim;
      std::vector<double> xn(dim);
      double mean = 0, var = 0;
      for (int64_t i = 0; i < dim; ++i) {
        const size_t k = (b * N + n) * dim + i;
        float v = x.v[k + x_offset] + y.v[k] * m[i];
        if (dt == ANYFLOW_DTYPE_BF16) v = test::bf16_round(v);
        xn[i] = rx[k] = v;
        mean += v;
      }
      mean /= dim;
      for (int64_t i = 0; i < dim; ++i) var += (xn[i] - mean) * (xn[i] - mean);
      const double rstd = 1.0 / std::sqrt(var / dim + 1e-6);
      for (int64_t i = 0; i < dim; ++i) {
        const double h = (xn[i] - mean) * rstd;
        rh[(b * N + n) * dim + i] =
            norm == ANYFLOW_NORM_MODULATE ? h * (1.0 + m[2 * dim + i]) + m[dim + i] : h * w.v[i];
      }
    }
  check(rc == ANYFLOW_SUCCESS && close(gx, rx, tol(dt), 1e-6, "x_new") && close(gh, rh, tol(dt), 1e-5, "h"),
        "residual_norm kernel matches the host reference");
}

// `x_offset`: x starts that many elements into its buffer (1: not 16-byte aligned, the unaligned path).
void gpu_rope(anyflow_dtype dt, bool norm, int64_t heads, int64_t dh, int64_t x_offset = 0) {
  const int64_t B = 2, L = 27, C = heads * dh, half = dh / 2;
  HostT x(dt, B * L * C + x_offset, 5, 2.f), w(ANYFLOW_DTYPE_F32, C, 6, 0.5f, 1.f);
  const size_t n = static_cast<size_t>(B * L * C);
  std::vector<float> cs(L * half), sn(L * half);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t j = 0; j < half; ++j) {
      const double ang = l * std::pow(10000.0, -2.0 * j / dh);
      cs[l * half + j] = static_cast<float>(std::cos(ang));
      sn[l * half + j] = static_cast<float>(std::sin(ang));
    }
  Dev dx = x.upload(), dw = w.upload(), dc(cs.size() * 4), ds(sn.size() * 4), out(x.bytes());
  const float* xv = x.v.data() + x_offset;
  cudaMemcpy(dc.p, cs.data(), cs.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(ds.p, sn.data(), sn.size() * 4, cudaMemcpyHostToDevice);
  cudaMemset(out.p, 0xff, x.bytes());
  anyflow_rope_args a = {};
  a.dtype = dt;
  a.batch = B;
  a.tokens = L;
  a.heads = heads;
  a.head_dim = dh;
  a.x = static_cast<const char*>(dx.p) + x_offset * (dt == ANYFLOW_DTYPE_BF16 ? 2 : 4);
  a.x_stride_b = L * C;
  a.x_stride_l = C;
  a.x_stride_h = dh;
  a.cos = dc.as<float>();
  a.sin = ds.as<float>();
  a.out = out.p;
  a.weight = dw.p;
  a.weight_dtype = ANYFLOW_DTYPE_F32;
  a.eps = 1e-6f;
  const int rc = norm ? anyflow_qk_norm_rope(&a, nullptr) : anyflow_apply_rope(&a, nullptr);
  cudaDeviceSynchronize();
  std::vector<double> ref(n);
  for (int64_t row = 0; row < B * L; ++row) {
    const int64_t l = row % L;
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += double(xv[row * C + c]) * xv[row * C + c];
    const double r = norm ? 1.0 / std::sqrt(ss / C + 1e-6) : 1.0;
    for (int64_t c = 0; c < C; c += 2) {
      const double re = xv[row * C + c] * r * (norm ? w.v[c] : 1.f);
      const double im = xv[row * C + c + 1] * r * (norm ? w.v[c + 1] : 1.f);
      const int64_t j = (c % dh) / 2;
      ref[row * C + c] = re * cs[l * half + j] - im * sn[l * half + j];
      ref[row * C + c + 1] = re * sn[l * half + j] + im * cs[l * half + j];
    }
  }
  check(rc == ANYFLOW_SUCCESS && close(download(out, dt, n), ref, tol(dt), 1e-6, norm ? "qk" : "rope"),
        norm ? "qk_norm_rope kernel matches the host reference" : "apply_rope kernel matches the host reference");
}

void gpu_euler(anyflow_dtype vdt) {
  const int64_t B = 2, F = 5, K = 37, n = B * F * K;
  HostT z(ANYFLOW_DTYPE_F32, n, 7), u(vdt, 2 * n, 8), dt(ANYFLOW_DTYPE_F32, B * F, 9, 0.2f, 0.5f);
  Dev dz = z.upload(), du = u.upload(), ddt = dt.upload(), out(n * 4);
  cudaMemset(out.p, 0xff, n * 4);
  anyflow_euler_args a = {};
  a.out = out.p;
  a.latents = dz.p;
  a.velocity = du.p;
  a.velocity_dtype = vdt;
  a.dt = ddt.as<float>();
  a.batch = B;
  a.outer = 1;
  a.frames = F;
  a.inner = K;
  a.cfg = 1;
  a.guidance_scale = 4.5f;
  a.num_context_frames = 2;
  const int rc = anyflow_euler_shortcut(&a, nullptr);
  cudaDeviceSynchronize();
  std::vector<double> ref(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t f = (i / K) % F;
    const double uu = u.v[i] + 4.5 * (double(u.v[i + n]) - u.v[i]);
    ref[i] = f < 2 ? z.v[i] : z.v[i] - dt.v[anyflow::frame_slot(i, 1, F, K)] * uu;
  }
  check(rc == ANYFLOW_SUCCESS && close(download(out, ANYFLOW_DTYPE_F32, n), ref, 1e-5, 1e-6, "z_r"),
        "euler_shortcut kernel (CFG, context frames) matches the host reference");
}

// Attention reference: queries attend to the union of `ranges[q]` keys (indices into the concatenated
// segments); q/k/v stored [B, H, L, D] contiguous per segment.
void gpu_attention(anyflow_dtype dt, int64_t D, anyflow_attn_impl impl, bool causal) {
  const int64_t B = 1, H = 2, Lq = causal ? 126 : 70;
  const std::vector<int64_t> seg_lens = causal ? std::vector<int64_t>{126} : std::vector<int64_t>{24, 0, 57, 70};
  HostT q(dt, B * H * Lq * D, 10);
  std::vector<HostT> ks, vs;
  for (size_t s = 0; s < seg_lens.size(); ++s) {
    ks.emplace_back(dt, B * H * seg_lens[s] * D, 20 + s);
    vs.emplace_back(dt, B * H * seg_lens[s] * D, 30 + s);
  }
  // chunk-causal: chunks of 6, 18, 18, 18, 18, 18, 18, 12 tokens
  std::vector<int64_t> layout;
  if (causal) {
    int64_t start = 0;
    for (int64_t c : {6, 18, 18, 18, 18, 18, 18, 12}) {
      layout.insert(layout.end(), {start, start + c, 1, 0, start + c});
      start += c;
    }
  }
  Dev dq = q.upload(), out(q.bytes()), lse(B * H * Lq * 4);
  std::vector<Dev> dk, dv;
  for (size_t s = 0; s < seg_lens.size(); ++s) {
    dk.push_back(ks[s].upload());
    dv.push_back(vs[s].upload());
  }
  cudaMemset(out.p, 0xff, q.bytes());
  anyflow_attention_args a = {};
  a.dtype = dt;
  a.batch = B;
  a.heads = H;
  a.q_len = Lq;
  a.head_dim = D;
  a.q = dq.p;
  a.q_stride_b = H * Lq * D;
  a.q_stride_h = Lq * D;
  a.q_stride_l = D;
  a.out = out.p;
  a.out_stride_b = H * Lq * D;
  a.out_stride_h = Lq * D;
  a.out_stride_l = D;
  a.lse = lse.as<float>();
  a.scale = static_cast<float>(1.0 / std::sqrt(double(D)));
  a.impl = impl;
  a.num_segments = static_cast<int32_t>(seg_lens.size());
  for (size_t s = 0; s < seg_lens.size(); ++s) {
    const int64_t L = seg_lens[s];
    a.segments[s] = {dk[s].p, dv[s].p, H * L * D, L * D, D, H * L * D, L * D, D, L};
  }
  const int rc = causal ? anyflow_chunk_causal_attention(&a, layout.data(), layout.size(), nullptr)
                        : anyflow_segmented_attention(&a, nullptr);
  cudaDeviceSynchronize();
  std::vector<double> ref(q.v.size()), ref_lse(B * H * Lq);
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t i = 0; i < Lq; ++i) {
      int64_t end = 0;  // causal: keys [0, end of the query's chunk)
      for (size_t g = 0; causal && g < layout.size(); g += 5)
        if (i >= layout[g] && i < layout[g + 1]) end = layout[g + 4];
      std::vector<double> s;
      std::vector<const float*> vrows;
      for (size_t sg = 0; sg < seg_lens.size(); ++sg)
        for (int64_t j = 0; j < (causal ? end : seg_lens[sg]); ++j) {
          const int64_t L = seg_lens[sg];
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += double(q.v[(bh * Lq + i) * D + d]) * ks[sg].v[(bh * L + j) * D + d];
          s.push_back(dot * a.scale);
          vrows.push_back(vs[sg].v.data() + (bh * L + j) * D);
        }
      const double mx = *std::max_element(s.begin(), s.end());
      double l = 0;
      for (double& x : s) l += (x = std::exp(x - mx));
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (size_t j = 0; j < s.size(); ++j) o += s[j] * vrows[j][d];
        ref[(bh * Lq + i) * D + d] = o / l;
      }
      ref_lse[bh * Lq + i] = mx + std::log(l);
    }
  const char* name = causal ? "chunk-causal" : "segmented";
  const bool ok = rc == ANYFLOW_SUCCESS && close(download(out, dt, q.v.size()), ref, tol(dt), 2e-6, name) &&
                  close(download(lse, ANYFLOW_DTYPE_F32, ref_lse.size()), ref_lse, 1e-5, 1e-4, "lse");
  std::printf("      (%s, D=%lld, impl=%d, rc=%d)\n", dt == ANYFLOW_DTYPE_BF16 ? "bf16" : "fp32",
              static_cast<long long>(D), static_cast<int>(impl), rc);
  check(ok, "attention kernel matches the host reference");
}

void test_on_device() {
  for (anyflow_dtype dt : {ANYFLOW_DTYPE_F32, ANYFLOW_DTYPE_BF16}) {
    gpu_residual_norm(dt, ANYFLOW_NORM_MODULATE, 64);
    gpu_residual_norm(dt, ANYFLOW_NORM_AFFINE, 1536);
    gpu_residual_norm(dt, ANYFLOW_NORM_MODULATE, 20);  // unaligned rows: scalar path
    // 14B width, x not 16-byte aligned: vector-width chunks with scalar accesses (was UNSUPPORTED)
    gpu_residual_norm(dt, ANYFLOW_NORM_MODULATE, 5120, 1);
    gpu_rope(dt, false, 3, 16);
    gpu_rope(dt, true, 12, 128);
    gpu_rope(dt, true, 3, 6);  // head dim not a multiple of the vector width
    gpu_rope(dt, true, 80, 128, 1);  // 10240 channels, x not 16-byte aligned (was UNSUPPORTED)
    gpu_rope(dt, false, 3, 16, 1);   // apply_rope, unaligned
    gpu_euler(dt);
    for (bool causal : {false, true}) {
      gpu_attention(dt, 40, ANYFLOW_ATTN_SIMT, causal);
      if (dt == ANYFLOW_DTYPE_BF16) {
        for (int64_t D : {64, 128}) {
          gpu_attention(dt, D, ANYFLOW_ATTN_SIMT, causal);
          gpu_attention(dt, D, ANYFLOW_ATTN_MMA, causal);
        }
      }
    }
  }
}

}  // namespace

int main() {
  test_validation();
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::printf("no CUDA device (%s): host-side checks only\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    test_launch_without_device();
  } else {
    test_on_device();
  }
  return test::finish();
}
