// The block-sparse forward's float path on a CPU with AVX-512: hand-written GEMM tiles instead of BLAS.
//
// Why: MKL reaches only ~75% of its large-matmul rate on these [64, 64] x [64, ~600] products (it packs k afresh
// on every call), and the exp could not join the GEMM. Here query rows lie across the vector lanes (Q^T packed
// once per block, up to 64 rows = 4 vectors), so
//   S^T tile:  acc[key j][rows] += k[j, x] * Q^T[x, rows]   (k[j, x] broadcast straight from k: no packing),
// with exp, mask and row sums applied to the accumulators before they are stored as E^T, and
//   O^T tile:  acc[x][rows] += v[j, x] * E^T[j, rows]        (v[j, x] broadcast straight from v).
// The masks are stored column-major ([.., X, bq]) so that a key's keep flags over the rows are one vector.
// Same algorithm and saved statistics as block_sparse.cpp's generic forward_block (see the top of that file).

#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "block_sparse.h"
#include "simd_exp.h"

namespace hybridattn_csrc::sparse::avx512 {

constexpr int kLanes = 16, kMaxVec = 4, kMaxRows = kLanes * kMaxVec;
// Keys per S^T tile and value columns per O^T tile for R row vectors: R * tile accumulators, at least 8
// independent FMA chains (two FMA ports of latency 4) and at most 24 so that the operands fit in 32 registers;
// one vector takes 16, so that a window edge's 16-key spans are one tile (12 + 4 left a tail of 4 chains).
constexpr int tile_width(int r) { return r == 1 ? 16 : r == 2 ? 8 : 6; }

struct Work {
  std::vector<float> qt, et, ot;
  alignas(64) float m[kMaxRows], l[kMaxRows];
  Work(int64_t d, int64_t dv) : qt(d * kMaxRows), et(kChunk * kMaxRows), ot(dv * kMaxRows) {}
};

// Calls f(std::integral_constant<int, n>) for a runtime vector count n in 1..kMaxVec.
template <typename F>
inline void with_vectors(int n, F f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// Calls f(std::integral_constant<int, n>) for a runtime remainder n in 1..W-1 (nothing for 0).
template <int W, typename F>
inline void with_tail(int64_t n, F f) {
  if constexpr (W > 1) {
    if (n == W - 1) return f(std::integral_constant<int, W - 1>{});
    with_tail<W - 1>(n, f);
  }
}

// Q^T's factor: unshifted blocks fold log2(e) into it, so that their scores come out as s log2(e) and exp(s) is
// 2^(score), two instructions fewer per 16 entries; shifted blocks keep natural units (their m is saved).
constexpr float kLog2e = 1.44269504088896341f;

// exp of 16 scores: unshifted blocks' logits are bounded by EXP_SAFE already (no shift, no clamp; the scores are
// s log2(e)); shifted ones are clamped to [-EXP_SAFE, 0]. Masked: times the keep flags of the rows in `lanes`
// (the others read as 0).
template <bool kShifted, bool kMasked>
inline __m512 exp_step(__m512 x, const float* shift, const float* keep, __mmask16 lanes) {
  __m512 e;
  if (kShifted) {
    x = _mm512_sub_ps(x, _mm512_loadu_ps(shift));
    e = exp16_in_range(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-float(kExpSafe))), _mm512_setzero_ps()));
  } else {
    e = exp2_16_in_range(x);
  }
  if (kMasked) e = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(lanes, keep));
  return e;
}

// In-register transpose of a 16 x 16 tile: afterwards r[i] lane j holds what r[j] lane i held.
inline void transpose16(__m512 (&r)[kLanes]) {
  __m512 t[kLanes];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), e = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  // now r[4 i + m], 128-bit lane L: column 4 L + m of rows 4 i .. 4 i + 3
  for (int m = 0; m < 4; ++m) {
    const __m512 a = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88), b = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xdd);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    const __m512 e = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xdd);
    t[m] = _mm512_shuffle_f32x4(a, c, 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(b, e, 0x88);
    t[8 + m] = _mm512_shuffle_f32x4(a, c, 0xdd);
    t[12 + m] = _mm512_shuffle_f32x4(b, e, 0xdd);
  }
  for (int i = 0; i < kLanes; ++i) r[i] = t[i];
}

inline __mmask16 first_lanes(int64_t n) {
  return n >= kLanes ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// qt[x][t] = scale * q[t][x] for the nr rows of q (row stride ldq), zero up to R * 16 rows; returns the largest
// squared norm of those scaled rows (the row-max shift decision's |scale| |q|, summed from the transposed tiles).
template <int R>
inline float pack_qt(const float* q, int64_t ldq, int64_t nr, int64_t d, float scale, float* qt) {
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 most = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    __m512 norm2 = _mm512_setzero_ps();  // lane i: row r * 16 + i
    for (int64_t x0 = 0; x0 < d; x0 += kLanes) {
      const __mmask16 cols = first_lanes(d - x0);
      __m512 tile[kLanes];
      for (int i = 0; i < kLanes; ++i) {
        const int64_t t = r * kLanes + i;
        tile[i] = t < nr ? _mm512_mul_ps(_mm512_maskz_loadu_ps(cols, q + t * ldq + x0), sc) : _mm512_setzero_ps();
      }
      transpose16(tile);
      for (int64_t c = 0; c < std::min<int64_t>(kLanes, d - x0); ++c) {
        _mm512_storeu_ps(qt + (x0 + c) * kMaxRows + r * kLanes, tile[c]);
        norm2 = _mm512_fmadd_ps(tile[c], tile[c], norm2);
      }
    }
    most = _mm512_max_ps(most, norm2);
  }
  return _mm512_reduce_max_ps(most);
}

// out[t][x] = ot[x][t] * inv[t] for the nr rows of out (row stride ldo); with `stream`, whole lines that start on
// a line are written with streaming stores.
template <int R>
inline void store_rows(const float* ot, const float* inv, int64_t nr, int64_t dv, float* out, int64_t ldo,
                       bool stream) {
  for (int r = 0; r < R; ++r)
    for (int64_t x0 = 0; x0 < dv; x0 += kLanes) {
      const int64_t nx = std::min<int64_t>(kLanes, dv - x0);
      __m512 tile[kLanes];
      for (int c = 0; c < kLanes; ++c)
        tile[c] = c < nx ? _mm512_loadu_ps(ot + (x0 + c) * kMaxRows + r * kLanes) : _mm512_setzero_ps();
      transpose16(tile);
      const bool lines = stream && nx == kLanes && reinterpret_cast<uintptr_t>(out + x0) % 64 == 0 && ldo % 16 == 0;
      for (int i = 0; i < kLanes && r * kLanes + i < nr; ++i) {
        const int64_t t = r * kLanes + i;
        const __m512 y = _mm512_mul_ps(tile[i], _mm512_set1_ps(inv[t]));
        if (lines)
          _mm512_stream_ps(out + t * ldo + x0, y);
        else
          _mm512_mask_storeu_ps(out + t * ldo + x0, first_lanes(nx), y);
      }
    }
}

// E^T rows for keys kp[0..J) (or raw S^T when kRaw: the shifted path takes the row maxima first).
template <int R, int J, bool kRaw, bool kShifted, bool kMasked>
inline void score_tile(const float* qt, int64_t d, const float* const* kp, const float* keep, int64_t ldm,
                       __mmask16 last, const float* shift, __m512* lsum, float* et) {
  // every loop over j and r unrolled, so that the accumulators and row sums stay in registers (with the loops
  // rolled, the compiler spilled the accumulators to the stack around the FMA loop and chained the row sums
  // through memory: the tile took ~8% longer)
  __m512 acc[J][R];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  for (int64_t x = 0; x < d; ++x) {
    __m512 qv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) qv[r] = _mm512_loadu_ps(qt + x * kMaxRows + r * kLanes);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      const __m512 kb = _mm512_set1_ps(kp[j][x]);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_fmadd_ps(kb, qv[r], acc[j][r]);
    }
  }
  __m512 sums[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) sums[r] = lsum[r];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m512 e = acc[j][r];
      if (!kRaw) {
        e = exp_step<kShifted, kMasked>(e, shift + r * kLanes, keep + j * ldm + r * kLanes,
                                        r == R - 1 ? last : __mmask16(0xFFFF));
        sums[r] = _mm512_add_ps(sums[r], e);
      }
      _mm512_storeu_ps(et + j * kMaxRows + r * kLanes, e);
    }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) lsum[r] = sums[r];
}

// Rows a later step reads (or writes, hint ET1), fetched a share at a time while the current step computes:
// a burst of them stalls on the line fill buffers (the next block's q and out rows, fetched all at once at the
// start of a block, took ~4% of the call).
struct Prefetch {
  const char* at = nullptr;
  int64_t rows = 0, row_bytes = 0, stride = 0;  // stride: bytes from one row to the next
  int hint = _MM_HINT_T0;
  int64_t first = 0, count = -1;  // the lines covered (rows * row lines in order), -1: to the end

  int64_t row_lines() const { return (row_bytes + 63) / 64; }
  int64_t end() const { return count < 0 ? rows * row_lines() : first + count; }
  // share i of n of the lines covered, as a Prefetch of its own
  Prefetch slice(int64_t i, int64_t n) const {
    Prefetch p = *this;
    const int64_t per = (end() - first + n - 1) / n;
    p.first = std::min(end(), first + i * per);
    p.count = std::min(end(), p.first + per) - p.first;
    return p;
  }
  // fetch share i of `parts`
  inline void part(int64_t i, int64_t parts) const {
    const Prefetch p = slice(i, parts);
    const int64_t per_row = row_lines();
    for (int64_t l = p.first; l < p.end(); ++l) {
      const char* a = at + (l / per_row) * stride + (l % per_row) * 64;
      if (hint == _MM_HINT_T0)
        _mm_prefetch(a, _MM_HINT_T0);
      else if (hint == _MM_HINT_T1)
        _mm_prefetch(a, _MM_HINT_T1);
      else
        _mm_prefetch(a, _MM_HINT_ET1);
    }
  }
};

template <int R, bool kRaw, bool kShifted, bool kMasked>
void score_piece(const float* qt, int64_t d, const float* k, int64_t ldk, int64_t width, const float* keep,
                 int64_t ldm, __mmask16 last, const float* shift, __m512* lsum, float* et, const Prefetch& pf_a,
                 const Prefetch& pf_b, const Prefetch& pf_c) {
  constexpr int J = tile_width(R);
  const float* kp[J];
  const int64_t tiles = std::max<int64_t>(1, width / J);
  int64_t j = 0;
  for (; j + J <= width; j += J) {
    pf_a.part(j / J, tiles);
    pf_b.part(j / J, tiles);
    pf_c.part(j / J, tiles);
    for (int t = 0; t < J; ++t) kp[t] = k + (j + t) * ldk;
    score_tile<R, J, kRaw, kShifted, kMasked>(qt, d, kp, keep + j * ldm, ldm, last, shift, lsum, et + j * kMaxRows);
  }
  for (int t = 0; j + t < width; ++t) kp[t] = k + (j + t) * ldk;
  with_tail<J>(width - j, [&](auto n) {
    score_tile<R, decltype(n)::value, kRaw, kShifted, kMasked>(qt, d, kp, keep + j * ldm, ldm, last, shift, lsum,
                                                               et + j * kMaxRows);
  });
}

template <int R, int X>
inline void out_tile(const float* et, int64_t width, const float* v, int64_t ldv, float* ot) {
  __m512 acc[X][R];  // in registers: every loop over x and r unrolled (see score_tile)
#pragma GCC unroll 16
  for (int x = 0; x < X; ++x)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[x][r] = _mm512_loadu_ps(ot + x * kMaxRows + r * kLanes);
  for (int64_t j = 0; j < width; ++j) {
    __m512 ev[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) ev[r] = _mm512_loadu_ps(et + j * kMaxRows + r * kLanes);
    const float* vj = v + j * ldv;
#pragma GCC unroll 16
    for (int x = 0; x < X; ++x) {
      const __m512 vb = _mm512_set1_ps(vj[x]);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[x][r] = _mm512_fmadd_ps(vb, ev[r], acc[x][r]);
    }
  }
#pragma GCC unroll 16
  for (int x = 0; x < X; ++x)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(ot + x * kMaxRows + r * kLanes, acc[x][r]);
}

// Keys in blocks of kOutKeys, all of O^T's columns per block: the block's E^T rows and v rows (16 KiB each) stay
// in L1 across the Dv / 6 passes instead of streaming from L2 on each.
constexpr int64_t kOutKeys = 64;

// Each key block's v rows are fetched into L1 while the block before runs, the last block fetching `next` (the
// next span's first rows).
template <int R>
void out_piece(const float* et, int64_t width, const float* v, int64_t ldv, int64_t dv, float* ot,
               const Prefetch& next) {
  constexpr int X = tile_width(R);
  const int64_t tiles = (dv + X - 1) / X;
  for (int64_t j = 0; j < width; j += kOutKeys) {
    const int64_t n = std::min(kOutKeys, width - j);
    const float* e = et + j * kMaxRows;
    const float* vj = v + j * ldv;
    const Prefetch ahead = j + kOutKeys < width
        ? Prefetch{reinterpret_cast<const char*>(vj + kOutKeys * ldv), std::min(kOutKeys, width - j - kOutKeys),
                   dv * 4, ldv * 4}
        : next;
    int64_t x = 0;
    for (; x + X <= dv; x += X) {
      ahead.part(x / X, tiles);
      out_tile<R, X>(e, n, vj + x, ldv, ot + x * kMaxRows);
    }
    ahead.part(x / X, tiles);
    // one tile for the remainder: single columns would load E^T once per R FMAs (64 = 10 * 6 + 4)
    with_tail<X>(dv - x, [&](auto c) { out_tile<R, decltype(c)::value>(e, n, vj + x, ldv, ot + x * kMaxRows); });
  }
}

// Keys [key, key + width) of a pass, at column col of its E^T, computed for the row vectors [vlo, vlo + nv) only.
struct Span {
  int64_t col, key, width;
  const float* keep;  // the first key's keep flags (row 0), or nullptr: fully kept
  int vlo, nv;
};

// A masked piece split into runs of keys that keep rows in the same row vectors: the rows of a window's edge
// tiles keep a triangle of the keys, so whole 16-row vectors of those tiles are masked (64-row blocks against a
// 513-key window computed 1.14x the kept pairs). Keys no row keeps are left out.
template <int R>
void split_by_rows(const Piece& pc, int64_t col, const float* keep, int64_t bq, __mmask16 last,
                   std::vector<Span>& spans) {
  int64_t start = 0;
  int lo0 = R, hi0 = -1;
  for (int64_t j = 0; j <= pc.width; ++j) {
    int lo = R, hi = -1;
    if (j < pc.width)
      for (int r = 0; r < R; ++r) {
        const __m512 f = _mm512_maskz_loadu_ps(r == R - 1 ? last : __mmask16(0xFFFF), keep + j * bq + r * kLanes);
        if (_mm512_cmp_ps_mask(f, _mm512_setzero_ps(), _CMP_NEQ_OQ)) {
          lo = std::min(lo, r);
          hi = r;
        }
      }
    if (j == pc.width || lo != lo0 || hi != hi0) {
      if (j > start && lo0 <= hi0)
        spans.push_back({col + start, pc.key + start, j - start, keep + start * bq, lo0, hi0 - lo0 + 1});
      start = j;
      lo0 = lo;
      hi0 = hi;
    }
  }
}

// Query rows [t0, t0 + nr) of head h (nr <= 64) of one query block, as the generic forward_block does for all
// heads of a key head at once; mask points at the keep flags of row t0 (column c at + c * bq); k, v: this key
// head's rows, gathered contiguous.
// Returns whether these rows took the row-max shift: only where a logit may leave [-EXP_SAFE, EXP_SAFE], i.e.
// |scale| max |q_t| * kmax (the largest |k| over the block's keys) > EXP_SAFE.
template <int R>
bool rows_block(const float* q, const float* k, const float* v, int64_t ldk, int64_t ldv, int64_t t0, int64_t nr,
                int64_t h, const std::vector<Piece>& pieces, const float* mask, int64_t bq, float kmax, float scale,
                const Layout& lay, float* out, float* m_out, float* l_out, std::vector<Span>& spans, Work& w) {
  const int64_t d = lay.d, dv = lay.dv, ldq = lay.hq * d, ldo = lay.hq * dv;
  const __mmask16 last = first_lanes(nr - (R - 1) * kLanes);
  // The next block's q and out rows are 256 B pieces 2 KiB apart, read or written once: fetched during this
  // block's first pass of scores (a miss on each cost as much as a tenth of the block's arithmetic).
  const int64_t next_rows = std::max<int64_t>(0, std::min(t0 + 2 * kMaxRows, lay.tq) - (t0 + kMaxRows));
  Prefetch next_q, next_out;  // empty past the last row
  if (next_rows > 0) {
    next_q = {reinterpret_cast<const char*>(q + (t0 + kMaxRows) * ldq + h * d), next_rows, d * 4, ldq * 4,
              _MM_HINT_T1};
    if (!lay.stream_out)  // streaming stores need no line in the cache
      next_out = {reinterpret_cast<const char*>(out + (t0 + kMaxRows) * ldo + h * dv), next_rows, dv * 4,
                  ldo * 4, _MM_HINT_ET1};
  }
  float* qt = w.qt.data();
  const float* rows = q + t0 * ldq + h * d;
  // packed for scores in units of log2(e) (see kLog2e), which most blocks take; shifted ones are packed again
  const double norm = std::sqrt(double(pack_qt<R>(rows, ldq, nr, d, scale * kLog2e, qt))) / double(kLog2e);
  const bool shifted = norm * kmax > kExpSafe;
  if (shifted) pack_qt<R>(rows, ldq, nr, d, scale, qt);
  std::fill(w.m, w.m + kMaxRows, shifted ? -std::numeric_limits<float>::infinity() : 0.f);
  std::fill(w.ot.begin(), w.ot.end(), 0.f);
  __m512 lsum[R];
  for (int r = 0; r < R; ++r) lsum[r] = _mm512_setzero_ps();
  for (size_t lo = 0; lo < pieces.size();) {
    size_t hi = lo;
    int64_t cols = 0;
    while (hi < pieces.size() && cols + pieces[hi].width <= kChunk) cols += pieces[hi++].width;
    spans.clear();
    int64_t col = 0;
    for (size_t p = lo; p < hi; col += pieces[p++].width) {
      const Piece& pc = pieces[p];
      const float* keep = pc.mask_col < 0 ? nullptr : mask + pc.mask_col * bq;
      if (keep && !shifted)
        split_by_rows<R>(pc, col, keep, bq, last, spans);
      else
        spans.push_back({col, pc.key, pc.width, keep, 0, R});
    }
    float* et = w.et.data();
    for (size_t i = 0; i < spans.size(); ++i)
      with_vectors(spans[i].nv, [&](auto nv) {
        // BigBird's random blocks lie anywhere in the head's rows: fetch the next span's keys and this span's
        // values (for the O pass below) while this span's scores are computed
        const Span& s = spans[i];
        Prefetch pf_k, pf_v{reinterpret_cast<const char*>(v + s.key * ldv), s.width, dv * 4, ldv * 4, _MM_HINT_T1};
        if (i + 1 < spans.size())
          pf_k = {reinterpret_cast<const char*>(k + spans[i + 1].key * ldk), spans[i + 1].width, d * 4, ldk * 4};
        constexpr int N = decltype(nv)::value;
        const __mmask16 lanes = s.vlo + N == R ? last : __mmask16(0xFFFF);
        const float* sq = qt + s.vlo * kLanes;
        float* se = et + s.col * kMaxRows + s.vlo * kLanes;
        const float* sk = k + s.key * ldk;
        const float* keep = s.keep ? s.keep + s.vlo * kLanes : nullptr;
        // the next block's rows: q in the first half of the first pass's spans, out in the second
        const int64_t n = static_cast<int64_t>(spans.size()), half = (n + 1) / 2, at = static_cast<int64_t>(i);
        const Prefetch pf_next = lo > 0 ? Prefetch{}
                                 : at < half ? next_q.slice(at, half) : next_out.slice(at - half, n - half);
        if (shifted)
          (keep ? score_piece<N, true, true, true> : score_piece<N, true, true, false>)(
              sq, d, sk, ldk, s.width, keep, bq, lanes, w.m + s.vlo * kLanes, lsum + s.vlo, se, pf_k, pf_v, pf_next);
        else
          (keep ? score_piece<N, false, false, true> : score_piece<N, false, false, false>)(
              sq, d, sk, ldk, s.width, keep, bq, lanes, w.m + s.vlo * kLanes, lsum + s.vlo, se, pf_k, pf_v, pf_next);
      });
    if (shifted) {  // online softmax over passes: running maximum over kept keys, then exp of the stored S^T
      float mx[kMaxRows];
      std::copy(w.m, w.m + kMaxRows, mx);
      et = w.et.data();
      for (size_t p = lo; p < hi; ++p)
        for (int64_t j = 0; j < pieces[p].width; ++j, et += kMaxRows)
          for (int64_t t = 0; t < nr; ++t)
            if (pieces[p].mask_col < 0 || mask[(pieces[p].mask_col + j) * bq + t] != 0.f)
              mx[t] = std::max(mx[t], et[t]);
      alignas(64) float ls[kMaxRows];
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(ls + r * kLanes, lsum[r]);
      for (int64_t t = 0; t < nr; ++t)
        if (mx[t] > w.m[t]) {
          const float alpha = w.m[t] == -std::numeric_limits<float>::infinity()
                                  ? 0.f : std::exp(std::max(w.m[t] - mx[t], float(-2 * kExpSafe)));
          ls[t] *= alpha;
          for (int64_t x = 0; x < dv; ++x) w.ot[x * kMaxRows + t] *= alpha;
          w.m[t] = mx[t];
        }
      for (int r = 0; r < R; ++r) lsum[r] = _mm512_loadu_ps(ls + r * kLanes);
      et = w.et.data();
      for (size_t p = lo; p < hi; ++p)
        for (int64_t j = 0; j < pieces[p].width; ++j, et += kMaxRows)
          for (int r = 0; r < R; ++r) {
            const float* keep = pieces[p].mask_col < 0 ? nullptr : mask + (pieces[p].mask_col + j) * bq;
            const __mmask16 lanes = r == R - 1 ? last : __mmask16(0xFFFF);
            const __m512 sv = _mm512_loadu_ps(et + r * kLanes);
            const __m512 e = keep ? exp_step<true, true>(sv, w.m + r * kLanes, keep + r * kLanes, lanes)
                                  : exp_step<true, false>(sv, w.m + r * kLanes, nullptr, lanes);
            _mm512_storeu_ps(et + r * kLanes, e);
            lsum[r] = _mm512_add_ps(lsum[r], e);
          }
    }
    for (size_t i = 0; i < spans.size(); ++i)
      with_vectors(spans[i].nv, [&](auto nv) {
        constexpr int N = decltype(nv)::value;
        const Span& s = spans[i];
        Prefetch next;
        if (i + 1 < spans.size())
          next = {reinterpret_cast<const char*>(v + spans[i + 1].key * ldv), std::min(kOutKeys, spans[i + 1].width),
                  dv * 4, ldv * 4};
        out_piece<N>(w.et.data() + s.col * kMaxRows + s.vlo * kLanes, s.width, v + s.key * ldv, ldv, dv,
                     w.ot.data() + s.vlo * kLanes, next);
      });
    lo = hi;
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(w.l + r * kLanes, lsum[r]);
  alignas(64) float inv[kMaxRows];
  // a row without any kept key has l = 0 exactly (a kept key weighs at least e^-40): out 0, m 0, l 1
  for (int64_t t = 0; t < nr; ++t) inv[t] = pieces.empty() || w.l[t] == 0.f ? 0.f : 1.f / w.l[t];
  store_rows<R>(w.ot.data(), inv, nr, dv, out + t0 * ldo + h * dv, ldo, lay.stream_out);
  for (int64_t t = 0; t < nr; ++t) {
    const int64_t row = (t0 + t) * lay.g + h % lay.g;
    m_out[row] = inv[t] == 0.f ? 0.f : w.m[t];
    l_out[row] = inv[t] == 0.f ? 1.f : w.l[t];
  }
  return shifted;
}

// One task: all G query heads of key head kvh, in row blocks of at most 64; returns whether any took the shift.
inline bool forward_block(const float* q, const float* k, const float* v, int64_t ldk, int64_t ldv, const int64_t* item,
                          const Piece* pieces_in, const float* mask, int64_t mask_stride_h, int64_t bq, float kmax,
                          float scale, const Layout& lay, int64_t kvh, float* out, float* m_out, float* l_out,
                          std::vector<Piece>& pieces, std::vector<Span>& spans, Work& w) {
  split_pieces(item, pieces_in, pieces);
  bool any = false;
  for (int64_t h = kvh * lay.g; h < (kvh + 1) * lay.g; ++h)
    for (int64_t t0 = item[0]; t0 < item[0] + item[1]; t0 += kMaxRows) {
      const int64_t nr = std::min<int64_t>(kMaxRows, item[0] + item[1] - t0);
      const float* mk = mask ? mask + (mask_stride_h ? h * mask_stride_h : 0) + (t0 - item[0]) : nullptr;
      auto run = nr > 48 ? rows_block<4> : nr > 32 ? rows_block<3> : nr > 16 ? rows_block<2> : rows_block<1>;
      any |= run(q, k, v, ldk, ldv, t0, nr, h, pieces, mk, bq, kmax, scale, lay, out, m_out, l_out, spans, w);
    }
  return any;
}

}  // namespace hybridattn_csrc::sparse::avx512
#endif
