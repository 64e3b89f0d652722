// One decoding step of Qwen3-Next's Gated DeltaNet layer between its two projections, as one call.
//
// Why: at one token the arithmetic here is ~0.2 MFLOP, but the PyTorch path spends it in ~150 small ops (splits,
// reshapes, the conv tail, norms, gates, the state update), ~1 ms per layer on a CPU: more than the layer's two
// weight-bound projections. This is the same computation as layers/mixers/gated_deltanet.py's forward for T = 1
// (the tests compare the two), with the conv tail and the state carried as the cache does.
//
// Inputs (float32 or float64, contiguous): qkvz [B, Hk, 2Dk + 2rDv] and ba [B, Hk, 2r] (in_proj outputs, r = Hv/Hk,
// grouped per key head as transformers lays them out); tail [B, K-1, C] the conv inputs before this token, with
// C = 2 Hk Dk + Hv Dv channels [q | k | v]; conv_w [C, K]; A_log, dt_bias [Hv]; state [B, Hv, Dk, Dv], UPDATED IN
// PLACE; norm_w [Dv]. Returns o [B, Hv * Dv] = rmsnorm(o) * norm_w * silu(z), ready for out_proj, and the new tail.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

constexpr double kFlush = -60.0;  // ops/_chunking.py FLUSH_LOG_DECAY: decays below e^-60 are exact zeros

template <typename T>
inline T silu(T x) {
  return x / (T(1) + std::exp(-x));
}

template <typename T>
inline T softplus(T x) {  // torch's: beta 1, threshold 20
  return x > T(20) ? x : std::log1p(std::exp(x));
}

template <typename T>
void decode_row(const T* qkvz, const T* ba, const T* tail, const T* conv_w, const T* a_log, const T* dt_bias,
                T* state, const T* norm_w, T* out, T* new_tail, int64_t hk, int64_t r, int64_t dk, int64_t dv,
                int64_t kc, double scale, double norm_eps, std::vector<T>& qkv) {
  const int64_t hv = hk * r, c = 2 * hk * dk + hv * dv, width = 2 * dk + 2 * r * dv;
  // Gather this token's conv inputs in the [q | k | v] channel order, then the depthwise conv over
  // [tail ; x] and SiLU; the new tail drops the oldest row.
  for (int64_t h = 0; h < hk; ++h) {
    const T* row = qkvz + h * width;
    std::copy(row, row + dk, qkv.data() + h * dk);
    std::copy(row + dk, row + 2 * dk, qkv.data() + hk * dk + h * dk);
    std::copy(row + 2 * dk, row + 2 * dk + r * dv, qkv.data() + 2 * hk * dk + h * r * dv);
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    const T* w = conv_w + ch * kc;
    T acc = w[kc - 1] * qkv[ch];
    for (int64_t i = 0; i < kc - 1; ++i) acc += w[i] * tail[i * c + ch];
    for (int64_t i = 0; i + 1 < kc - 1; ++i) new_tail[i * c + ch] = tail[(i + 1) * c + ch];
    if (kc > 1) new_tail[(kc - 2) * c + ch] = qkv[ch];
    qkv[ch] = silu(acc);
  }
  // l2norm(q), l2norm(k) per key head (epsilon inside the root, as fla and transformers).
  for (int64_t part = 0; part < 2; ++part) {
    for (int64_t h = 0; h < hk; ++h) {
      T* x = qkv.data() + part * hk * dk + h * dk;
      T ss = 0;
      for (int64_t i = 0; i < dk; ++i) ss += x[i] * x[i];
      const T inv = T(1) / std::sqrt(ss + T(1e-6));
      for (int64_t i = 0; i < dk; ++i) x[i] *= inv;
    }
  }
  for (int64_t h = 0; h < hv; ++h) {
    const int64_t kh = h / r, j = h % r;
    const T* q = qkv.data() + kh * dk;
    const T* k = qkv.data() + hk * dk + kh * dk;
    const T* v = qkv.data() + 2 * hk * dk + h * dv;
    const T* z = qkvz + kh * width + 2 * dk + r * dv + j * dv;
    const T beta = T(1) / (T(1) + std::exp(-ba[kh * 2 * r + j]));
    const double g = -std::exp(static_cast<double>(a_log[h])) *
                     static_cast<double>(softplus<T>(ba[kh * 2 * r + r + j] + dt_bias[h]));
    const T decay = g < kFlush ? T(0) : static_cast<T>(std::exp(g));
    T* s = state + h * dk * dv;
    T* o = out + h * dv;
    // S <- decay S;  u = beta (v - S^T k);  S <- S + k u^T;  o = S^T (scale q).
    std::vector<T> u(dv, T(0));
    for (int64_t a = 0; a < dk; ++a) {
      T* sa = s + a * dv;
      const T ka = k[a];
      for (int64_t b = 0; b < dv; ++b) {
        sa[b] *= decay;
        u[b] += ka * sa[b];
      }
    }
    for (int64_t b = 0; b < dv; ++b) u[b] = beta * (v[b] - u[b]);
    std::fill(o, o + dv, T(0));
    for (int64_t a = 0; a < dk; ++a) {
      T* sa = s + a * dv;
      const T ka = k[a], qa = static_cast<T>(scale) * q[a];
      for (int64_t b = 0; b < dv; ++b) {
        sa[b] += ka * u[b];
        o[b] += qa * sa[b];
      }
    }
    // Gated RMSNorm: rms(o) * w * silu(z).
    T ss = 0;
    for (int64_t b = 0; b < dv; ++b) ss += o[b] * o[b];
    const T inv = T(1) / std::sqrt(ss / T(dv) + static_cast<T>(norm_eps));
    for (int64_t b = 0; b < dv; ++b) o[b] = o[b] * inv * norm_w[b] * silu(z[b]);
  }
}

std::vector<at::Tensor> gdn_decode_step(const at::Tensor& qkvz, const at::Tensor& ba, const at::Tensor& tail,
                                        const at::Tensor& conv_w, const at::Tensor& a_log, const at::Tensor& dt_bias,
                                        at::Tensor state, const at::Tensor& norm_w, double scale, double norm_eps) {
  TORCH_CHECK(qkvz.is_contiguous() && ba.is_contiguous() && tail.is_contiguous() && conv_w.is_contiguous() &&
                  state.is_contiguous(),
              "gdn_decode_step: inputs must be contiguous");
  const int64_t b = qkvz.size(0), hk = qkvz.size(1), hv = state.size(1), dk = state.size(2), dv = state.size(3);
  const int64_t r = hv / hk, kc = conv_w.size(1), c = conv_w.size(0);
  TORCH_CHECK(qkvz.size(2) == 2 * dk + 2 * r * dv && c == 2 * hk * dk + hv * dv, "gdn_decode_step: bad sizes");
  at::Tensor out = at::empty({b, hv * dv}, qkvz.options());
  at::Tensor new_tail = at::empty_like(tail);
  AT_DISPATCH_FLOATING_TYPES(qkvz.scalar_type(), "gdn_decode_step", [&] {
    using T = scalar_t;
    std::vector<T> qkv(c);
    for (int64_t i = 0; i < b; ++i) {
      decode_row<T>(qkvz.data_ptr<T>() + i * hk * qkvz.size(2), ba.data_ptr<T>() + i * hk * 2 * r,
                    tail.data_ptr<T>() + i * (kc - 1) * c, conv_w.data_ptr<T>(), a_log.data_ptr<T>(),
                    dt_bias.data_ptr<T>(), state.data_ptr<T>() + i * hv * dk * dv, norm_w.data_ptr<T>(),
                    out.data_ptr<T>() + i * hv * dv, new_tail.data_ptr<T>() + i * (kc - 1) * c, hk, r, dk, dv, kc,
                    scale, norm_eps, qkv);
    }
  });
  return {out, new_tail};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridattn, m) {
  m.def("gdn_decode_step(Tensor qkvz, Tensor ba, Tensor tail, Tensor conv_w, Tensor A_log, Tensor dt_bias, "
        "Tensor(a!) state, Tensor norm_w, float scale, float norm_eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hybridattn, CPU, m) { m.impl("gdn_decode_step", &gdn_decode_step); }
