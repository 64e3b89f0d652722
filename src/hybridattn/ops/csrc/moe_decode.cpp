// The mixture-of-experts SwiGLU feed-forward for a few tokens (decoding), as one call.
//
// Why: at one token each expert is two weight-bound matrix-vector products, and the PyTorch path wraps the k
// experts, the router and the shared expert in ~50 small ops (~0.5 ms per layer on a CPU) around ~1 ms of weight
// reads. Same computation as layers/moe.py's MoEFeedForward.forward (the tests compare the two):
//
//   p = softmax(router x); (w, e) = top-k(p); w /= sum(w) if norm_topk_prob
//   y = sum_j down[e_j] (silu(gate[e_j] x) * up[e_j] x * w_j)  +  sigmoid(shared_gate x) * shared(x)
//
// Shapes (float32 or float64, contiguous): x [N, d]; router [E, d]; gate_up [E, 2I, d] (gate rows first);
// down [E, d, I]; optional shared expert gate_w, up_w [Is, d], down [d, Is] and its gate [1, d] (all or none).
// Returns y [N, d] and the router logits [N, E].

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "blas.h"

namespace {

using namespace hybridattn_csrc;

template <typename T>
inline T silu(T x) {
  return x / (T(1) + std::exp(-x));
}

template <typename T>
void swiglu_into(const T* gate_w, const T* up_w, const T* down, const T* x, int64_t d, int64_t inner, T weight,
                 T* hidden, T* y) {
  // hidden = silu(gate x) * (up x) * weight;  y += down hidden
  matvec<T>(gate_w, inner, d, x, hidden);
  matvec<T>(up_w, inner, d, x, hidden + inner);
  for (int64_t i = 0; i < inner; ++i) hidden[i] = silu(hidden[i]) * hidden[inner + i] * weight;
  matvec<T>(down, d, inner, hidden, y, T(1), T(1));
}

std::vector<at::Tensor> moe_decode(const at::Tensor& x, const at::Tensor& router, const at::Tensor& gate_up,
                                   const at::Tensor& down, int64_t top_k, bool norm_topk_prob,
                                   const c10::optional<at::Tensor>& shared_gate_w,
                                   const c10::optional<at::Tensor>& shared_up_w,
                                   const c10::optional<at::Tensor>& shared_down,
                                   const c10::optional<at::Tensor>& shared_gate) {
  TORCH_CHECK(x.is_contiguous() && router.is_contiguous() && gate_up.is_contiguous() && down.is_contiguous(),
              "moe_decode: inputs must be contiguous");
  const int64_t n = x.size(0), d = x.size(1), e = router.size(0), inner = down.size(2);
  const bool shared = shared_gate_w.has_value();
  const int64_t shared_inner = shared ? shared_down->size(1) : 0;
  at::Tensor y = at::zeros({n, d}, x.options());
  at::Tensor logits = at::empty({n, e}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "moe_decode", [&] {
    using T = scalar_t;
    std::vector<T> hidden(2 * std::max(inner, shared_inner));
    std::vector<double> prob(e);
    std::vector<int64_t> order(e);
    for (int64_t row = 0; row < n; ++row) {
      const T* xr = x.data_ptr<T>() + row * d;
      T* yr = y.data_ptr<T>() + row * d;
      T* lr = logits.data_ptr<T>() + row * e;
      matvec<T>(router.data_ptr<T>(), e, d, xr, lr);
      // softmax in double (the PyTorch path uses at least float32: the top-k choice must not flip on rounding)
      const double mx = *std::max_element(lr, lr + e);
      double total = 0;
      for (int64_t i = 0; i < e; ++i) total += (prob[i] = std::exp(static_cast<double>(lr[i]) - mx));
      for (int64_t i = 0; i < e; ++i) prob[i] /= total;
      std::iota(order.begin(), order.end(), 0);
      // descending probability, lower index first on ties (as torch.topk on a CPU)
      std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int64_t a, int64_t b) {
        return prob[a] > prob[b] || (prob[a] == prob[b] && a < b);
      });
      double chosen = 0;
      for (int64_t j = 0; j < top_k; ++j) chosen += prob[order[j]];
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t ex = order[j];
        const T w = static_cast<T>(norm_topk_prob ? prob[ex] / chosen : prob[ex]);
        const T* gu = gate_up.data_ptr<T>() + ex * 2 * inner * d;
        swiglu_into<T>(gu, gu + inner * d, down.data_ptr<T>() + ex * d * inner, xr, d, inner, w, hidden.data(), yr);
      }
      if (shared) {
        T gate_logit;
        matvec<T>(shared_gate->data_ptr<T>(), 1, d, xr, &gate_logit);
        const T gate = T(1) / (T(1) + std::exp(-gate_logit));
        swiglu_into<T>(shared_gate_w->data_ptr<T>(), shared_up_w->data_ptr<T>(), shared_down->data_ptr<T>(), xr, d,
                       shared_inner, gate, hidden.data(), yr);
      }
    }
  });
  return {y, logits};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridattn, m) {
  m.def("moe_decode(Tensor x, Tensor router, Tensor gate_up, Tensor down, int top_k, bool norm_topk_prob, "
        "Tensor? shared_gate_w, Tensor? shared_up_w, Tensor? shared_down, Tensor? shared_gate) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hybridattn, CPU, m) { m.impl("moe_decode", &moe_decode); }
