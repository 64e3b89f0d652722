// The backward of the gated delta rule's chunk form on a CPU, one (batch, value head) pair per task.
//
// Same formulas as ops/_gated_delta_chunk.py::chunk_backward (the chain rule through the forward's six lines,
// walking the chunks in reverse and recomputing each chunk from its saved start state); why compiled: as for the
// forward (gated_delta.cpp), ~30 small products per chunk batched over heads leave the second core idle and pay
// an op dispatch each.
//
// Without beta it is the backward of the scalar-decay linear attention (simple_gla, retention, linear_attention):
// the chunk writes V itself, so the solve and the delta rule's terms drop out.
//
// Inputs (contiguous, one float dtype): q, k [B, T, Hk, Dk]; v, do [B, T, Hv, Dv]; g, beta [B, T, Hv] (optional);
// states [N, B*Hv, Dk, Dv] (the forward's chunk-start states); ds [B, Hv, Dk, Dv] (the final state's gradient).
// Returns dq, dk per VALUE head [B, T, Hv, Dk] (the caller sums each GVA group: two threads never write one key
// head), dv [B, T, Hv, Dv], dg [B, T, Hv] (empty without g), dbeta [B, T, Hv] (empty without beta) and
// dh0 [B, Hv, Dk, Dv].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "chunk_common.h"

namespace {

using namespace hybridattn_csrc;

template <typename T>
struct Grad {  // one thread's per-chunk buffers
  int64_t c, dk, dv;
  std::vector<T> kk, qk, l, a, p, ks, qs, vr, nw, kd, dnew, dp, dqk, dog, dkd, da, dks, sym, dsn, ds, dgm;
  ChunkDecay<T> dec;
  Grad(int64_t c_, int64_t dk_, int64_t dv_)
      : c(c_), dk(dk_), dv(dv_), kk(c * c), qk(c * c), l(c * c), a(c * c), p(c * c), ks(c * dv), qs(c * dv),
        vr(c * dv), nw(c * dv), kd(c * dk), dnew(c * dv), dp(c * c), dqk(c * c), dog(c * dv), dkd(c * dk),
        da(c * c), dks(c * dv), sym(c * c), dsn(dk * dv), ds(dk * dv), dgm(c), dec(c) {}
};

// The delta rule's own terms of a chunk's gradients, given dr = (I + A)^-T dN and dA: r = beta (V - G K S) gives
// dV = beta dr, dbeta = <dr, vr> + <dA, K K^T L>_row and d(KS) = -G beta dr; A = beta K K^T * L gives
// dK = (dKK + dKK^T) K + dKS S^T (the caller adds the terms shared with plain linear attention).
template <typename T>
void delta_input_grads(int64_t cc, int64_t dk, int64_t dv, const T* kc, int64_t ldq, const T* s, const T* bt,
                       int64_t ldg, const T* dr, const T* vr, const T* kk, const T* l, const T* da, const T* gexp,
                       T* dvc, int64_t ldv, T* dbeta, T* dks, T* sym, T* dkc, int64_t lddk) {
  for (int64_t i = 0; i < cc; ++i) {
    const T bi = bt[i * ldg], gi = gexp ? gexp[i] : T(1);
    T acc = 0;
    for (int64_t x = 0; x < dv; ++x) {
      const T d = dr[i * dv + x];
      acc += d * vr[i * dv + x];
      dvc[i * ldv + x] = bi * d;
      dks[i * dv + x] = -gi * bi * d;
    }
    for (int64_t j = 0; j < i; ++j) acc += da[i * cc + j] * kk[i * cc + j] * l[i * cc + j];
    dbeta[i * ldg] = acc;
  }
  for (int64_t i = 0; i < cc; ++i)
    for (int64_t j = 0; j < cc; ++j)
      sym[i * cc + j] = da[i * cc + j] * l[i * cc + j] * bt[i * ldg] + da[j * cc + i] * l[j * cc + i] * bt[j * ldg];
  mm<T>(false, false, cc, dk, cc, T(1), sym, cc, kc, ldq, T(0), dkc, lddk);
  mm<T>(false, true, cc, dk, dv, T(1), dks, dv, s, dv, T(1), dkc, lddk);
}

template <typename T>
void backward_head(const T* q, const T* k, const T* v, const T* g, const T* beta, const T* dout, const T* states,
                   int64_t states_stride, T* dq, T* dkey, T* dval, T* dg, T* dbeta, T* dstate, int64_t t, int64_t c,
                   int64_t dk, int64_t dv, int64_t ldq, int64_t ldv, int64_t ldg, int64_t lddk, T scale, Grad<T>& w) {
  std::copy(dstate, dstate + dk * dv, w.ds.data());  // in: the final state's gradient; out: dh0
  T* ds = w.ds.data();
  const int64_t nchunks = (t + c - 1) / c;
  for (int64_t n = nchunks - 1; n >= 0; --n) {
    const int64_t lo = n * c, cc = std::min(c, t - lo);
    const T *qc = q + lo * ldq, *kc = k + lo * ldq, *vc = v + lo * ldv, *doc = dout + lo * ldv;
    const T* s = states + n * states_stride;
    // Without beta (scalar-decay linear attention) the chunk writes V itself: N = V, no A, no solve.
    const bool delta = beta != nullptr;
    const T* bt = delta ? beta + lo * ldg : nullptr;
    if (g) w.dec.compute(g + lo * ldg, ldg, cc);
    const ChunkDecay<T>& dec = w.dec;
    auto G = [&](int64_t i) { return g ? dec.gexp[i] : T(1); };
    auto E = [&](int64_t i) { return g ? dec.kdec[i] : T(1); };
    // Recompute: L, A = strict_lower(beta K K^T * L), P = scale Q K^T * L, KS, QS, vr = V - G KS, N.
    T *kk = w.kk.data(), *qk = w.qk.data(), *l = w.l.data(), *a = w.a.data(), *p = w.p.data();
    if (delta) mm<T>(false, true, cc, cc, dk, T(1), kc, ldq, kc, ldq, T(0), kk, cc);
    mm<T>(false, true, cc, cc, dk, T(1), qc, ldq, kc, ldq, T(0), qk, cc);
    for (int64_t i = 0; i < cc; ++i) {
      const T bi = delta ? bt[i * ldg] : T(0);
      for (int64_t j = 0; j < cc; ++j) {
        const T lij = j > i ? T(0) : (g ? dec.decay(i, j) : T(1));
        l[i * cc + j] = lij;
        if (delta) a[i * cc + j] = j < i ? kk[i * cc + j] * lij * bi : T(0);
        p[i * cc + j] = qk[i * cc + j] * lij * scale;
      }
    }
    T *ks = w.ks.data(), *qs = w.qs.data(), *vr = w.vr.data(), *nw = w.nw.data();
    if (g) mm<T>(false, false, cc, dv, dk, T(1), qc, ldq, s, dv, T(0), qs, dv);
    const T* nwp = vc;  // N, the chunk's writes
    int64_t ldn = ldv;
    if (delta) {
      mm<T>(false, false, cc, dv, dk, T(1), kc, ldq, s, dv, T(0), ks, dv);
      for (int64_t i = 0; i < cc; ++i) {
        const T gi = G(i), bi = bt[i * ldg];
        for (int64_t x = 0; x < dv; ++x) {
          vr[i * dv + x] = vc[i * ldv + x] - gi * ks[i * dv + x];
          nw[i * dv + x] = bi * vr[i * dv + x];
        }
      }
      solve_unit_lower<T>(cc, dv, a, cc, nw, dv);
      nwp = nw;
      ldn = dv;
    }
    T* kd = w.kd.data();
    for (int64_t i = 0; i < cc; ++i)
      for (int64_t x = 0; x < dk; ++x) kd[i * dk + x] = E(i) * kc[i * ldq + x];
    // O = scale diag(G) Q S + P N and S' = G_C S + Kd^T N: dN = Kd dS + P^T dO, dP = dO N^T.
    // Without the delta rule dN is dV itself: written straight into the output.
    T *dp = w.dp.data(), *dqk = w.dqk.data(), *dog = w.dog.data();
    T* dvc = dval + lo * ldv;
    T* dnew = delta ? w.dnew.data() : dvc;
    const int64_t ldd = delta ? dv : ldv;
    mm<T>(false, false, cc, dv, dk, T(1), kd, dk, ds, dv, T(0), dnew, ldd);
    mm<T>(true, false, cc, dv, cc, T(1), p, cc, doc, ldv, T(1), dnew, ldd);
    mm<T>(false, true, cc, cc, dv, T(1), doc, ldv, nwp, ldn, T(0), dp, cc);
    for (int64_t x = 0; x < cc * cc; ++x) dqk[x] = dp[x] * l[x];
    for (int64_t i = 0; i < cc; ++i)
      for (int64_t x = 0; x < dv; ++x) dog[i * dv + x] = G(i) * doc[i * ldv + x];
    // dQ = scale (dQK K + diag(G) dO S^T)
    T* dqc = dq + lo * lddk;
    mm<T>(false, false, cc, dk, cc, scale, dqk, cc, kc, ldq, T(0), dqc, lddk);
    mm<T>(false, true, cc, dk, dv, scale, dog, dv, s, dv, T(1), dqc, lddk);
    T* dkd = w.dkd.data();
    mm<T>(false, true, cc, dk, dv, T(1), nwp, ldn, ds, dv, T(0), dkd, dk);
    T* da = w.da.data();
    T* dks = w.dks.data();
    T* dkc = dkey + lo * lddk;
    if (delta) {
      // N = (I + A)^-1 r: dr = (I + A)^-T dN (in dnew), dA = -strict_lower(dr N^T).
      solve_unit_lower<T>(cc, dv, a, cc, dnew, dv, /*transpose=*/true);
      mm<T>(false, true, cc, cc, dv, T(-1), dnew, dv, nw, dv, T(0), da, cc);
      for (int64_t i = 0; i < cc; ++i) std::fill(da + i * cc + i, da + (i + 1) * cc, T(0));
      delta_input_grads<T>(cc, dk, dv, kc, ldq, s, bt, ldg, dnew, vr, kk, l, da, g ? dec.gexp.data() : nullptr, dvc,
                           ldv, dbeta + lo * ldg, dks, w.sym.data(), dkc, lddk);
      mm<T>(true, false, cc, dk, cc, scale, dqk, cc, qc, ldq, T(1), dkc, lddk);
    } else {
      mm<T>(true, false, cc, dk, cc, scale, dqk, cc, qc, ldq, T(0), dkc, lddk);
    }
    for (int64_t i = 0; i < cc; ++i)
      for (int64_t x = 0; x < dk; ++x) dkc[i * lddk + x] += E(i) * dkd[i * dk + x];
    if (g) {
      // d gamma through G (the output's and r's read of S), e = exp(gamma_C - gamma), G_C, and L.
      T* dgm = w.dgm.data();
      T de_sum = 0;
      for (int64_t i = 0; i < cc; ++i) {
        T dgexp = 0, de = 0;
        for (int64_t x = 0; x < dv; ++x) dgexp += scale * doc[i * ldv + x] * qs[i * dv + x];
        if (delta)
          for (int64_t x = 0; x < dv; ++x) dgexp -= dvc[i * ldv + x] * ks[i * dv + x];
        for (int64_t x = 0; x < dk; ++x) de += kc[i * ldq + x] * dkd[i * dk + x];
        de *= dec.kdec[i];
        de_sum += de;
        dgm[i] = dgexp * dec.gexp[i] - de;
      }
      for (int64_t i = 0; i < cc; ++i) {
        const T bi = delta ? bt[i * ldg] : T(0);
        for (int64_t j = 0; j <= i; ++j) {
          T dl = dp[i * cc + j] * qk[i * cc + j] * scale;
          if (delta) dl += da[i * cc + j] * bi * kk[i * cc + j];
          dl *= l[i * cc + j];
          dgm[i] += dl;
          dgm[j] -= dl;
        }
      }
      T dss = 0;
      for (int64_t x = 0; x < dk * dv; ++x) dss += ds[x] * s[x];
      dgm[cc - 1] += de_sum + dss * dec.gexp[cc - 1];
      // gamma is a chunk-local cumulative sum of g: dg_t = sum over s >= t in the chunk of dgamma_s
      T run = 0;
      for (int64_t i = cc - 1; i >= 0; --i) {
        run += dgm[i];
        dg[(lo + i) * ldg] = run;
      }
    }
    // dS (chunk start) = K^T dKS + scale Q^T diag(G) dO + G_C dS
    T* dsn = w.dsn.data();
    const T gc = G(cc - 1);
    for (int64_t x = 0; x < dk * dv; ++x) dsn[x] = gc * ds[x];
    if (delta) mm<T>(true, false, dk, dv, cc, T(1), kc, ldq, dks, dv, T(1), dsn, dv);
    mm<T>(true, false, dk, dv, cc, scale, qc, ldq, dog, dv, T(1), dsn, dv);
    std::swap(w.ds, w.dsn);
    ds = w.ds.data();
  }
  std::copy(ds, ds + dk * dv, dstate);
}
std::vector<at::Tensor> gdn_chunk_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& beta,
                                      const at::Tensor& states, double scale, int64_t chunk_size,
                                      const at::Tensor& dout, const at::Tensor& dstate) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && states.is_contiguous() &&
                  dout.is_contiguous(),
              "gdn_chunk_bwd: inputs must be contiguous");
  const int64_t b = k.size(0), t = k.size(1), hk = k.size(2), dk = k.size(3), hv = v.size(2), dv = v.size(3);
  const int64_t grp = hv / hk, c = chunk_size;
  at::Tensor dq = at::empty({b, t, hv, dk}, q.options()), dkey = at::empty({b, t, hv, dk}, q.options());
  at::Tensor dval = at::empty({b, t, hv, dv}, v.options());
  at::Tensor dg = g.has_value() ? at::empty({b, t, hv}, v.options()) : at::empty({0}, v.options());
  at::Tensor dbeta = beta.has_value() ? at::empty({b, t, hv}, v.options()) : at::empty({0}, v.options());
  at::Tensor dh0 = dstate.contiguous().clone();
  at::Tensor gc, bc;
  if (g.has_value()) gc = g->contiguous();
  if (beta.has_value()) bc = beta->contiguous();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "gdn_chunk_bwd", [&] {
    using T = scalar_t;
    at::parallel_for(0, b * hv, 1, [&](int64_t begin, int64_t end) {
      Grad<T> w(c, dk, dv);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t bi = bh / hv, h = bh % hv, kh = h / grp;
        const int64_t qoff = bi * t * hk * dk + kh * dk, voff = bi * t * hv * dv + h * dv, goff = bi * t * hv + h;
        const int64_t koff = bi * t * hv * dk + h * dk;  // dq, dk per value head
        backward_head<T>(q.data_ptr<T>() + qoff, k.data_ptr<T>() + qoff, v.data_ptr<T>() + voff,
                         g.has_value() ? gc.data_ptr<T>() + goff : nullptr,
                         beta.has_value() ? bc.data_ptr<T>() + goff : nullptr,
                         dout.data_ptr<T>() + voff, states.data_ptr<T>() + bh * dk * dv, b * hv * dk * dv,
                         dq.data_ptr<T>() + koff, dkey.data_ptr<T>() + koff, dval.data_ptr<T>() + voff,
                         g.has_value() ? dg.data_ptr<T>() + goff : nullptr,
                         beta.has_value() ? dbeta.data_ptr<T>() + goff : nullptr,
                         dh0.data_ptr<T>() + bh * dk * dv, t, c, dk, dv, hk * dk, hv * dv, hv, hv * dk,
                         static_cast<T>(scale), w);
      }
    });
  });
  return {dq, dkey, dval, dg, dbeta, dh0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridattn, m) {
  m.def("gdn_chunk_bwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, Tensor states, float scale, "
        "int chunk_size, Tensor dout, Tensor dstate) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hybridattn, CPU, m) { m.impl("gdn_chunk_bwd", &gdn_chunk_bwd); }
