// Row-major wrappers of the Fortran BLAS that libtorch_cpu exports, shared by the compiled kernels.

#pragma once

#include <cstdint>

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
void sgemv_(const char*, const int*, const int*, const float*, const float*, const int*, const float*, const int*,
            const float*, float*, const int*);
void dgemv_(const char*, const int*, const int*, const double*, const double*, const int*, const double*,
            const int*, const double*, double*, const int*);
}

namespace hybridattn_csrc {

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

inline void blas_gemv(const char* t, const int* m, const int* n, const float* alpha, const float* a, const int* lda,
                      const float* x, const int* incx, const float* beta, float* y, const int* incy) {
  sgemv_(t, m, n, alpha, a, lda, x, incx, beta, y, incy);
}
inline void blas_gemv(const char* t, const int* m, const int* n, const double* alpha, const double* a,
                      const int* lda, const double* x, const int* incx, const double* beta, double* y,
                      const int* incy) {
  dgemv_(t, m, n, alpha, a, lda, x, incx, beta, y, incy);
}

// y[rows] = alpha * W[rows, cols] x + beta * y, W row-major. Column-major BLAS sees W^T, hence 'T'.
template <typename T>
inline void matvec(const T* w, int64_t rows, int64_t cols, const T* x, T* y, T alpha = T(1), T beta = T(0)) {
  const char t = 'T';
  const int m = static_cast<int>(cols), n = static_cast<int>(rows), one = 1;
  blas_gemv(&t, &m, &n, &alpha, w, &m, x, &one, &beta, y, &one);
}

}  // namespace hybridattn_csrc
