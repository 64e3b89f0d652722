// The chunk-local decay factors shared by the compiled chunk kernels (gated_delta*.cpp).

#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "blas.h"

namespace hybridattn_csrc {

// Log-decays below this give exact zeros (ops/_chunking.py FLUSH_LOG_DECAY): no denormal arithmetic.
constexpr double kFlush = -60.0;

template <typename T>
inline T exp_flushed(double x) {
  return x < kFlush ? T(0) : static_cast<T>(std::exp(x));
}

// Chunk-local cumulative log-decay gamma of rows [0, cc) from per-token log-decays g (row stride ldg), G = exp(gamma),
// e = exp(gamma_C - gamma), and, when every gamma lies in [-60, 0] ("mild"), 1 / G, so that
// L[i, j] = exp(gamma_i - gamma_j) = G_i / G_j in one product with no overflow and no factor below e^-60.
template <typename T>
struct ChunkDecay {
  std::vector<double> gam;
  std::vector<T> gexp, kdec, inv;
  bool mild = true;
  explicit ChunkDecay(int64_t c) : gam(c), gexp(c), kdec(c), inv(c) {}

  void compute(const T* g, int64_t ldg, int64_t cc) {
    double acc = 0;
    mild = true;
    for (int64_t i = 0; i < cc; ++i) {
      acc += static_cast<double>(g[i * ldg]);
      gam[i] = acc;
      mild = mild && acc >= kFlush && acc <= 0;
    }
    for (int64_t i = 0; i < cc; ++i) {
      gexp[i] = exp_flushed<T>(gam[i]);
      kdec[i] = exp_flushed<T>(gam[cc - 1] - gam[i]);
      if (mild) inv[i] = T(1) / gexp[i];
    }
  }

  T decay(int64_t i, int64_t j) const {  // L[i, j] for j <= i
    return mild ? gexp[i] * inv[j] : exp_flushed<T>(gam[i] - gam[j]);
  }
};

}  // namespace hybridattn_csrc
