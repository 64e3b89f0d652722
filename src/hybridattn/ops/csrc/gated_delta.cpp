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

// The Fortran BLAS that libtorch_cpu exports (MKL or OpenBLAS, LP64). ATen's own cpublas::gemm is not exported
// for float64; where these symbols are missing the library fails to load and the ops use the PyTorch forms.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
void strsm_(const char*, const char*, const char*, const char*, const int*, const int*, const float*, const float*,
            const int*, float*, const int*);
void dtrsm_(const char*, const char*, const char*, const char*, const int*, const int*, const double*,
            const double*, const int*, double*, const int*);
}

namespace {

// Log-decays below this give exact zeros (ops/_chunking.py FLUSH_LOG_DECAY): no denormal arithmetic.
constexpr double kFlush = -60.0;

template <typename T>
inline T exp_flushed(double x) {
  return x < kFlush ? T(0) : static_cast<T>(std::exp(x));
}

// Row-major C[m, n] = alpha * op(A)[m, k] op(B)[k, n] + beta * C, with row strides lda, ldb, ldc. BLAS is
// column-major, where a row-major matrix reads as its transpose: so C^T = op(B)^T op(A)^T.
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                      const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                      const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                      const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void blas_trsm(const char* side, const char* uplo, const char* ta, const char* diag, const int* m,
                      const int* n, const float* alpha, const float* a, const int* lda, float* b, const int* ldb) {
  strsm_(side, uplo, ta, diag, m, n, alpha, a, lda, b, ldb);
}
inline void blas_trsm(const char* side, const char* uplo, const char* ta, const char* diag, const int* m,
                      const int* n, const double* alpha, const double* a, const int* lda, double* b, const int* ldb) {
  dtrsm_(side, uplo, ta, diag, m, n, alpha, a, lda, b, ldb);
}

// Row-major X[m, n] <- (I + strict_lower(A))^-1 X, A [m, m] with row stride lda (its diagonal and upper part never
// read). Column-major, X^T (I + A)^T = X_old^T, and row-major A reads as the upper-triangular A^T.
template <typename T>
inline void solve_unit_lower(int64_t m, int64_t n, const T* a, int64_t lda, T* x, int64_t ldx) {
  const char side = 'R', uplo = 'U', tr = 'N', diag = 'U';
  const int m_ = static_cast<int>(n), n_ = static_cast<int>(m), lda_ = static_cast<int>(lda);
  const int ldx_ = static_cast<int>(ldx);
  const T one = 1;
  blas_trsm(&side, &uplo, &tr, &diag, &m_, &n_, &one, a, &lda_, x, &ldx_);
}

template <typename T>
inline void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const int m_ = static_cast<int>(m), n_ = static_cast<int>(n), k_ = static_cast<int>(k);
  const int lda_ = static_cast<int>(lda), ldb_ = static_cast<int>(ldb), ldc_ = static_cast<int>(ldc);
  blas_gemm(&trb, &tra, &n_, &m_, &k_, &alpha, b, &ldb_, a, &lda_, &beta, c, &ldc_);
}

template <typename T>
struct Work {  // one thread's per-chunk buffers, reused for every chunk of every head it owns
  std::vector<T> kk, qk, r, kd, gexp, kdec, inv;
  std::vector<double> gam;
  Work(int64_t c, int64_t dk, int64_t dv)
      : kk(c * c), qk(c * c), r(c * dv), kd(c * dk), gexp(c), kdec(c), inv(c), gam(c) {}
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
    // Chunk-local cumulative log-decay gamma, G = exp(gamma), e = exp(gamma_C - gamma).
    bool mild = true;  // every gamma in [-60, 0]: L[i, j] = G_i / G_j with no overflow and no tiny factor
    if (g) {
      double acc = 0;
      for (int64_t i = 0; i < cc; ++i) {
        acc += static_cast<double>(g[(lo + i) * ldg]);
        w.gam[i] = acc;
        mild = mild && acc >= kFlush && acc <= 0;
      }
      for (int64_t i = 0; i < cc; ++i) {
        w.gexp[i] = exp_flushed<T>(w.gam[i]);
        w.kdec[i] = exp_flushed<T>(w.gam[cc - 1] - w.gam[i]);
        if (mild) w.inv[i] = T(1) / w.gexp[i];
      }
    }
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
      } else if (mild) {
        const T gi = w.gexp[i];
        const T* inv = w.inv.data();
        for (int64_t j = 0; j <= i; ++j) {
          const T l = gi * inv[j];
          if (delta) ka[j] *= l * bi;
          pa[j] *= l;
        }
      } else {
        for (int64_t j = 0; j <= i; ++j) {
          const T l = exp_flushed<T>(w.gam[i] - w.gam[j]);
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
      const T gi = g ? w.gexp[i] : T(1);
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
      const T gc = w.gexp[cc - 1];
      for (int64_t x = 0; x < dk * dv; ++x) s[x] *= gc;
      T* kd = w.kd.data();
      for (int64_t i = 0; i < cc; ++i) {
        const T e = w.kdec[i];
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
