// Helpers shared by the compiled chunk kernels: row-major wrappers of the Fortran BLAS that libtorch_cpu exports,
// and the chunk-local decay factors.

#pragma once

#include <cmath>
#include <cstdint>
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

namespace hybridattn_csrc {

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
// With transpose, X <- (I + strict_lower(A))^-T X (the backward's solve).
template <typename T>
inline void solve_unit_lower(int64_t m, int64_t n, const T* a, int64_t lda, T* x, int64_t ldx,
                             bool transpose = false) {
  const char side = 'R', uplo = 'U', tr = transpose ? 'T' : 'N', diag = 'U';
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
