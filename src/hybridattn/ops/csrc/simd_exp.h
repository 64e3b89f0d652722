// A vectorised exp for the compiled kernels' float paths (AVX-512 only; other CPUs use std::exp).

#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace hybridattn_csrc {

// AVX-512 exp of x with |x| <= 87 (exp(-87) is still a normal float): 10 instructions per 16 entries, against
// 4 * D FLOPs of GEMM per entry (std::exp is a scalar libm call per element and gcc does not vectorise it without
// -ffast-math). x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so that r is exact), e^r by a degree-5
// minimax polynomial (relative error 7.5e-8 on that interval; 2e-7 in float32 arithmetic, about 2 ulp), then
// scalef by 2^n. The softmax kernels feed it logits already bounded by their EXP_SAFE, so it skips the clamp.
inline __m512 exp16_in_range(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(8.2976548e-3f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1915383e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6667575e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.9998894e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.9999970e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0000001f));
  return _mm512_scalef_ps(y, n);
}

// 2^t for |t| <= 126: t = n + r with |r| <= 1/2 (exact in float), 2^r by a degree-5 minimax polynomial (relative
// error 7.5e-8, 2e-7 in float32 arithmetic), scalef by 2^n. Two instructions fewer than exp16_in_range: a kernel
// that can fold log2(e) into its operands (the block-sparse forward scales Q by it) uses this one.
inline __m512 exp2_16_in_range(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(t, n);
  __m512 y = _mm512_set1_ps(1.32764713e-03f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.67554189e-03f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.55071309e-02f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(2.40221202e-01f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(6.93146944e-01f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.00000012e+00f));
  return _mm512_scalef_ps(y, n);
}

}  // namespace hybridattn_csrc
#endif
