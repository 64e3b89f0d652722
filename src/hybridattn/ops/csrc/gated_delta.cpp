// The chunk form of the gated delta rule on a CPU, one (batch, value head) pair per task.
//
// Same algorithm as ops/_gated_delta_chunk.py::chunk_forward (read its docstring for the six lines per chunk);
// why it exists: the Python form batches each per-chunk product over the B*H heads, and those [BH, 64, 128]
// products are too small for MKL to spread over threads, so the second core sat idle. Here each thread owns whole
// heads and walks their chunks with single-threaded BLAS calls on operands that stay in its L2, and no op
// dispatch runs between them.
//
// Without beta the same pass is the chunk form of the scalar-decay gated linear attention (simple_gla, retention,
// linear_attention; ops/_gated_linear_chunk.py): the chunk writes V itself, no K K^T and no solve.
//
// Layout (as the Python entry point passes them, all contiguous): q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv];
// g (log-decay) and beta [B, T, Hv], both optional; h0 [B, Hv, Dk, Dv] (optional). Returns o [B, T, Hv, Dv], the final
// state [B, Hv, Dk, Dv] and, when save_states, the state at each chunk start [N, B*Hv, Dk, Dv] (the backward's
// input); otherwise an empty tensor.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "chunk_common.h"

namespace {

using namespace hybridattn_csrc;

template <typename T>
struct Work {  // one thread's per-chunk buffers, reused for every chunk of every head it owns
  std::vector<T> kk, qk, r, kd;
  ChunkDecay<T> dec;
  Work(int64_t c, int64_t dk, int64_t dv) : kk(c * c), qk(c * c), r(c * dv), kd(c * dk), dec(c) {}
};

template <typename T>
void forward_head(const T* q, const T* k, const T* v, const T* g, const T* beta, T* o, T* s, T* states,
                  int64_t states_stride, int64_t t, int64_t c, int64_t dk, int64_t dv, int64_t ldq, int64_t ldv,
                  int64_t ldg, T scale, Work<T>& w) {
  for (int64_t lo = 0, n = 0; lo < t; lo += c, ++n) {
    const int64_t cc = std::min(c, t - lo);
    const T* qc = q + lo * ldq;
    const T* kc = k + lo * ldq;
    const T* vc = v + lo * ldv;
    T* oc = o + lo * ldv;
    if (states) std::copy(s, s + dk * dv, states + n * states_stride);
    if (g) w.dec.compute(g + lo * ldg, ldg, cc);
    const ChunkDecay<T>& dec = w.dec;
    T* kk = w.kk.data();
    T* qk = w.qk.data();
    // Without beta (the plain gated linear attention) the chunk writes V itself: no K K^T, no solve.
    const bool delta = beta != nullptr;
    if (delta) mm<T>(false, true, cc, cc, dk, T(1), kc, ldq, kc, ldq, T(0), kk, cc);
    mm<T>(false, true, cc, cc, dk, T(1), qc, ldq, kc, ldq, T(0), qk, cc);
    // A = strict_lower(beta K K^T * L) (in kk), P = lower(Q K^T * L) (in qk); the solve never reads A's upper part.
    for (int64_t i = 0; i < cc; ++i) {
      const T bi = delta ? beta[(lo + i) * ldg] : T(0);
      T* ka = kk + i * cc;
      T* pa = qk + i * cc;
      if (!g) {
        if (delta)
          for (int64_t j = 0; j < i; ++j) ka[j] *= bi;
      } else if (dec.mild) {  // kept apart from the exp branch so that it vectorises
        const T gi = dec.gexp[i];
        for (int64_t j = 0; j <= i; ++j) {
          const T l = gi * dec.inv[j];
          if (delta) ka[j] *= l * bi;
          pa[j] *= l;
        }
      } else {
        for (int64_t j = 0; j <= i; ++j) {
          const T l = dec.decay(i, j);
          if (delta) ka[j] *= l * bi;
          pa[j] *= l;
        }
      }
      std::fill(pa + i + 1, pa + cc, T(0));
    }
    // r = beta (V - diag(G) K S);  O = scale (diag(G) Q S + P N), N = V without the delta rule.
    T* r = w.r.data();
    if (delta) mm<T>(false, false, cc, dv, dk, T(1), kc, ldq, s, dv, T(0), r, dv);
    mm<T>(false, false, cc, dv, dk, T(1), qc, ldq, s, dv, T(0), oc, ldv);
    for (int64_t i = 0; i < cc; ++i) {
      const T gi = g ? dec.gexp[i] : T(1);
      T* oi = oc + i * ldv;
      const T os = scale * gi;
      for (int64_t j = 0; j < dv; ++j) oi[j] *= os;
      if (delta) {
        const T bi = beta[(lo + i) * ldg];
        const T* vi = vc + i * ldv;
        T* ri = r + i * dv;
        for (int64_t j = 0; j < dv; ++j) ri[j] = bi * (vi[j] - gi * ri[j]);
      }
    }
    const T* nw = vc;
    int64_t ldn = ldv;
    if (delta) {  // N = (I + A)^-1 r, in place in r
      solve_unit_lower<T>(cc, dv, kk, cc, r, dv);
      nw = r;
      ldn = dv;
    }
    mm<T>(false, false, cc, dv, cc, scale, qk, cc, nw, ldn, T(1), oc, ldv);
    // S' = G_C S + (diag(e) K)^T N.
    const T* kw = kc;
    int64_t ldk = ldq;
    if (g) {
      const T gc = dec.gexp[cc - 1];
      for (int64_t x = 0; x < dk * dv; ++x) s[x] *= gc;
      T* kd = w.kd.data();
      for (int64_t i = 0; i < cc; ++i) {
        const T e = dec.kdec[i];
        const T* ki = kc + i * ldq;
        for (int64_t x = 0; x < dk; ++x) kd[i * dk + x] = e * ki[x];
      }
      kw = kd;
      ldk = dk;
    }
    mm<T>(true, false, dk, dv, cc, T(1), kw, ldk, nw, ldn, T(1), s, dv);
  }
}

std::vector<at::Tensor> gdn_chunk_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& beta,
                                      const c10::optional<at::Tensor>& h0, double scale, int64_t chunk_size,
                                      bool save_states) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "gdn_chunk_fwd: q, k, v must be contiguous");
  const int64_t b = k.size(0), t = k.size(1), hk = k.size(2), dk = k.size(3), hv = v.size(2), dv = v.size(3);
  const int64_t grp = hv / hk, c = chunk_size, nchunks = (t + c - 1) / c;
  at::Tensor o = at::empty({b, t, hv, dv}, v.options());
  at::Tensor s = h0.has_value() ? h0->contiguous().clone() : at::zeros({b, hv, dk, dv}, v.options());
  at::Tensor states = save_states ? at::empty({nchunks, b * hv, dk, dv}, v.options()) : at::empty({0}, v.options());
  at::Tensor gc, bc;
  if (g.has_value()) gc = g->contiguous();
  if (beta.has_value()) bc = beta->contiguous();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "gdn_chunk_fwd", [&] {
    using T = scalar_t;
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    const T* gp = g.has_value() ? gc.data_ptr<T>() : nullptr;
    const T* bp = beta.has_value() ? bc.data_ptr<T>() : nullptr;
    T* op = o.data_ptr<T>();
    T* sp = s.data_ptr<T>();
    T* stp = save_states ? states.data_ptr<T>() : nullptr;
    at::parallel_for(0, b * hv, 1, [&](int64_t begin, int64_t end) {
      Work<T> w(c, dk, dv);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t bi = bh / hv, h = bh % hv, kh = h / grp;
        const int64_t qoff = bi * t * hk * dk + kh * dk, voff = bi * t * hv * dv + h * dv, goff = bi * t * hv + h;
        forward_head<T>(qp + qoff, kp + qoff, vp + voff, gp ? gp + goff : nullptr, bp ? bp + goff : nullptr,
                        op + voff,
                        sp + bh * dk * dv, stp ? stp + bh * dk * dv : nullptr, b * hv * dk * dv, t, c, dk, dv,
                        hk * dk, hv * dv, hv, static_cast<T>(scale), w);
      }
    });
  });
  return {o, s, states};
}

}  // namespace

// A fragment: every csrc file adds its ops to the one torch.ops.hybridattn namespace from its own library.
TORCH_LIBRARY_FRAGMENT(hybridattn, m) {
  m.def("gdn_chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, Tensor? h0, float scale, "
        "int chunk_size, bool save_states) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hybridattn, CPU, m) { m.impl("gdn_chunk_fwd", &gdn_chunk_fwd); }
