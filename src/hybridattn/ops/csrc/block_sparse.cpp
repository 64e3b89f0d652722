// The block-sparse softmax attention forward on a CPU, one (batch row, key head, query block) per task.
//
// Same algorithm and saved statistics as ops/block_sparse_attention.py::_BlockSparseSoftmax.forward (read its
// docstring); why it exists: there every step of a query block is a separate torch op on a [H, 64, ~600] tile
// (matmul, exp, mask multiply, row sum, division) -- about ten passes over the tile through op dispatch, all
// batched over heads, so a second core gets tiles too small to split. Here a thread takes whole query blocks,
// runs S = Q K^T and E V as single-threaded BLAS calls straight on k / v (a contiguous key range is a matrix with
// row stride Hkv * D: no gather), and does the exp, the mask and the row sum in one pass over S while it is in L1 / L2.
//
// Plan (built once per BlockPlan by block_sparse_plan.py::native_layout): items [N, 6] per query block
// (q_start, rows, piece_begin, piece_end, group, mask_row) and pieces [P, 3] (key_start, width, mask_col): the
// block's keys as contiguous ranges, each either fully kept (mask_col -1, no masking) or masked by columns
// [mask_col, mask_col + width) of masks[group] [Bm, Gm, Hm, bq, X] (0 / 1 in the compute dtype; row mask_row of
// its G dimension). shifted [N] (uint8): whether the block needs the row-max shift (else m = 0: every logit is
// bounded by EXP_SAFE, see _shift_needed).
//
// Outputs, written in place: out [B, Tq, Hq, Dv]; m, l [B, Hkv, Tq * G] (row shift and row sum, rows in (t, g)
// order: the backward's input). Rows that keep no key get out = 0, m = 0, l = 1 (finite for the backward, which
// zeroes them). Rows of query blocks not in items are left as the caller initialised them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "simd_exp.h"

namespace {

using namespace hybridattn_csrc;

// As ops/block_sparse_attention.py EXP_SAFE: shifted logits are clamped to [-40, 0], so kept keys weigh at least
// e^-40 (never subnormal) and the backward, which clamps the same way, recomputes the same weights.
constexpr double kExpSafe = 40.0;
// Columns of S per pass: a 64-row block's S stays in L2 however many keys the block reads (global tokens' rows
// read all of them); longer key lists take several passes with the online-softmax rescale.
constexpr int64_t kChunk = 1024;

// One row of one piece: s <- exp(s - shift) (clamped to [-EXP_SAFE, 0] when shifted), times keep (read every
// ks-th element: the masks are stored column-major) when masked; returns the row sum. The generic path (float64,
// or a CPU without AVX-512): std::exp per element.
template <typename T, bool kShifted, bool kMasked>
inline T exp_row(T* s, const T* keep, int64_t ks, int64_t n, T shift) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    T x = s[j] - shift;
    if (kShifted) x = std::min(std::max(x, T(-kExpSafe)), T(0));
    T e = std::exp(x);
    if (kMasked) e *= keep[j * ks];
    s[j] = e;
    sum += e;
  }
  return sum;
}

template <typename T>
inline T max_row(const T* s, const T* keep, int64_t ks, int64_t n, T start) {
  T mx = start;
  for (int64_t j = 0; j < n; ++j)
    if (!keep || keep[j * ks] != T(0)) mx = std::max(mx, s[j]);
  return mx;
}

#if defined(__AVX512F__)
template <bool kShifted, bool kMasked>
inline __m512 exp_step(__m512 x, __m512 shift, const float* keep, __mmask16 lanes) {
  x = _mm512_sub_ps(x, shift);
  if (kShifted) x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-float(kExpSafe))), _mm512_setzero_ps());
  __m512 e = exp16(x);
  if (kMasked) e = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(lanes, keep));
  return e;
}
#endif

struct Piece {
  int64_t key, width, mask_col;
};

// A query block's pieces, split at kChunk columns.
inline void split_pieces(const int64_t* item, const Piece* pieces_in, std::vector<Piece>& out) {
  out.clear();
  for (int64_t p = item[2]; p < item[3]; ++p) {
    Piece pc = pieces_in[p - item[2]];
    while (pc.width > 0) {
      const int64_t wd = std::min(pc.width, kChunk);
      out.push_back({pc.key, wd, pc.mask_col});
      pc.key += wd;
      pc.width -= wd;
      if (pc.mask_col >= 0) pc.mask_col += wd;
    }
  }
}

template <typename T>
struct Work {  // one thread's buffers, reused for every query block it owns
  std::vector<T> q, s, o, m, l;
  std::vector<Piece> pieces;
  Work(int64_t rows, int64_t d, int64_t dv) : q(rows * d), s(rows * kChunk), o(rows * dv), m(rows), l(rows) {}
};

struct Layout {  // sizes and strides of one call
  int64_t tq, tk, hq, hkv, g, d, dv;
};

// One key head's k and v rows, gathered contiguous ([Tk, D] and [Tk, Dv]) by the thread that works on that head.
// Why: in [B, T, H, D] a head's rows lie H * D * 4 bytes apart (2 KiB at H = 8, D = 64), and reading them in place
// made the tiles' loads miss (4K aliasing, no prefetch): gathered once per head, the Longformer forward ran ~30%
// faster. The tasks of a thread are consecutive (batch row, key head, query block) triples, so it gathers each
// head it touches once.
template <typename T>
struct HeadRows {
  std::vector<T> k, v;
  int64_t current = -1;
  void gather(const T* kp, const T* vp, int64_t bh, const Layout& lay) {
    if (bh == current) return;
    const int64_t bi = bh / lay.hkv, h = bh % lay.hkv;
    k.resize(lay.tk * lay.d);
    v.resize(lay.tk * lay.dv);
    const T* ks = kp + bi * lay.tk * lay.hkv * lay.d + h * lay.d;
    const T* vs = vp + bi * lay.tk * lay.hkv * lay.dv + h * lay.dv;
    for (int64_t t = 0; t < lay.tk; ++t) {
      std::copy(ks + t * lay.hkv * lay.d, ks + t * lay.hkv * lay.d + lay.d, k.data() + t * lay.d);
      std::copy(vs + t * lay.hkv * lay.dv, vs + t * lay.hkv * lay.dv + lay.dv, v.data() + t * lay.dv);
    }
    current = bh;
  }
};

// Runs ``fn(first, count)`` for each maximal run of pieces [first, first + count) whose keys are contiguous: one
// GEMM per run rather than per piece.
template <typename F>
inline void for_key_runs(const std::vector<Piece>& p, size_t lo, size_t hi, F fn) {
  while (lo < hi) {
    size_t end = lo + 1;
    while (end < hi && p[end].key == p[end - 1].key + p[end - 1].width) ++end;
    fn(lo, end);
    lo = end;
  }
}

template <typename T>
void forward_block(const T* q, const T* k, const T* v, const int64_t* item, const Piece* pieces_in,
                   const T* mask, int64_t mask_stride_h, int64_t bq, int64_t mask_cols, bool shifted, T scale,
                   const Layout& lay, int64_t kvh, T* out, T* m_out, T* l_out, Work<T>& w) {
  const int64_t start = item[0], rows = item[1], g = lay.g, n = rows * g, d = lay.d, dv = lay.dv;
  const int64_t ldq = lay.hq * d, ldk = d, ldv = dv, ldo = lay.hq * dv;  // k, v: one head's rows (HeadRows)
  // Q rows in (t, g) order: with GQA the G query heads of a key head are extra rows of one GEMM (copied, as
  // their rows are not evenly spaced). The scale goes into the GEMM's alpha, not into q: the backward recomputes
  // S as alpha (q k^T) and any difference in its rounding would reach the gradients amplified by exp().
  const T* qb = q + start * ldq + kvh * g * d;
  int64_t ldqb = ldq;
  if (g > 1) {
    T* dst = w.q.data();
    for (int64_t t = 0; t < rows; ++t) std::copy(qb + t * ldq, qb + t * ldq + g * d, dst + t * g * d);
    qb = dst;
    ldqb = d;
  }
  split_pieces(item, pieces_in, w.pieces);  // then grouped into passes of at most kChunk columns
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T* mrow = w.m.data();
  T* lrow = w.l.data();
  T* o = w.o.data();
  T* s = w.s.data();
  std::fill(mrow, mrow + n, shifted ? neg_inf : T(0));
  std::fill(lrow, lrow + n, T(0));
  bool first = true;
  // mask row of query row (t, j): its head's plane when the mask has one per head
  auto keep_row = [&](int64_t t, int64_t j) {  // then column c at + c * bq
    return mask + (mask_stride_h ? (kvh * g + j) * mask_stride_h : 0) + t;
  };
  for (size_t lo = 0; lo < w.pieces.size();) {
    size_t hi = lo;
    int64_t cols = 0;
    while (hi < w.pieces.size() && cols + w.pieces[hi].width <= kChunk) cols += w.pieces[hi++].width;
    // S[:, c] = (scale q) k^T over this pass's keys
    int64_t c0 = 0;
    for_key_runs(w.pieces, lo, hi, [&](size_t a, size_t b) {
      int64_t width = 0;
      for (size_t p = a; p < b; ++p) width += w.pieces[p].width;
      mm<T>(false, true, n, width, d, scale, qb, ldqb, k + w.pieces[a].key * ldk, ldk, T(0), s + c0, kChunk);
      c0 += width;
    });
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t j = 0; j < g; ++j) {
        const int64_t r = t * g + j;
        T* sr = s + r * kChunk;
        if (shifted) {  // online softmax: the running maximum over kept keys, earlier passes rescaled
          T mx = mrow[r];
          int64_t c = 0;
          for (size_t p = lo; p < hi; c += w.pieces[p++].width) {
            const Piece& pc = w.pieces[p];
            mx = max_row<T>(sr + c, pc.mask_col < 0 ? nullptr : keep_row(t, j) + pc.mask_col * bq, bq, pc.width,
                             mx);
          }
          if (mx > mrow[r]) {
            const T alpha = mrow[r] == neg_inf ? T(0) : std::exp(std::max(mrow[r] - mx, T(-2 * kExpSafe)));
            if (!first) {
              lrow[r] *= alpha;
              for (int64_t x = 0; x < dv; ++x) o[r * dv + x] *= alpha;
            }
            mrow[r] = mx;
          }
        }
        const T shift = mrow[r];
        T sum = 0;
        int64_t c = 0;
        for (size_t p = lo; p < hi; c += w.pieces[p++].width) {
          const Piece& pc = w.pieces[p];
          if (pc.mask_col < 0) {
            sum += shifted ? exp_row<T, true, false>(sr + c, nullptr, 0, pc.width, shift)
                           : exp_row<T, false, false>(sr + c, nullptr, 0, pc.width, shift);
          } else {
            const T* keep = keep_row(t, j) + pc.mask_col * bq;
            sum += shifted ? exp_row<T, true, true>(sr + c, keep, bq, pc.width, shift)
                           : exp_row<T, false, true>(sr + c, keep, bq, pc.width, shift);
          }
        }
        lrow[r] += sum;
      }
    // O (+)= E v over this pass's keys
    c0 = 0;
    for_key_runs(w.pieces, lo, hi, [&](size_t a, size_t b) {
      int64_t width = 0;
      for (size_t p = a; p < b; ++p) width += w.pieces[p].width;
      mm<T>(false, false, n, dv, width, T(1), s + c0, kChunk, v + w.pieces[a].key * ldv, ldv,
            first ? T(0) : T(1), o, dv);
      first = false;
      c0 += width;
    });
    lo = hi;
  }
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t j = 0; j < g; ++j) {
      const int64_t r = t * g + j, row = (start + t) * g + j;
      T* dst = out + (start + t) * ldo + (kvh * g + j) * dv;
      if (first || lrow[r] == T(0)) {  // no kept key (l = 0 exactly: a kept key weighs at least e^-40)
        std::fill(dst, dst + dv, T(0));
        m_out[row] = 0;
        l_out[row] = 1;
      } else {
        const T inv = T(1) / lrow[r];
        for (int64_t x = 0; x < dv; ++x) dst[x] = o[r * dv + x] * inv;
        m_out[row] = mrow[r];
        l_out[row] = lrow[r];
      }
    }
}

#if defined(__AVX512F__)
// The float path with AVX-512 and hand-written GEMM tiles instead of BLAS: MKL reaches only ~75% of its large-matmul
// rate on these [64, 64] x [64, ~600] products (it packs k afresh on every call), and the exp could not join the
// GEMM. Here query rows lie across the vector lanes (Q^T packed once per block, up to 64 rows = 4 vectors), so
//   S^T tile:  acc[key j][rows] += k[j, x] * Q^T[x, rows]   (k[j, x] broadcast straight from k: no packing),
// with exp, mask and row sums applied to the accumulators before they are stored as E^T, and
//   O^T tile:  acc[x][rows] += v[j, x] * E^T[j, rows]        (v[j, x] broadcast straight from v).
// The masks are stored column-major ([.., X, bq]) so that a key's keep flags over the rows are one vector.
namespace fast {

constexpr int kLanes = 16, kMaxVec = 4, kMaxRows = kLanes * kMaxVec, kKeyTile = 6, kOutTile = 6;

struct Work {
  std::vector<float> qt, et, ot;
  alignas(64) float m[kMaxRows], l[kMaxRows];
  Work(int64_t d, int64_t dv) : qt(d * kMaxRows), et(kChunk * kMaxRows), ot(dv * kMaxRows) {}
};

// E^T rows for keys kp[0..J) (or raw S^T when kRaw: the shifted path takes the row maxima first).
template <int R, int J, bool kRaw, bool kShifted, bool kMasked>
inline void score_tile(const float* qt, int64_t d, const float* const* kp, const float* keep, int64_t ldm,
                       __mmask16 last, const float* shift, __m512* lsum, float* et) {
  __m512 acc[J][R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  for (int64_t x = 0; x < d; ++x) {
    __m512 qv[R];
    for (int r = 0; r < R; ++r) qv[r] = _mm512_loadu_ps(qt + x * kMaxRows + r * kLanes);
    for (int j = 0; j < J; ++j) {
      const __m512 kb = _mm512_set1_ps(kp[j][x]);
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_fmadd_ps(kb, qv[r], acc[j][r]);
    }
  }
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) {
      __m512 e = acc[j][r];
      if (!kRaw) {
        e = exp_step<kShifted, kMasked>(e, _mm512_loadu_ps(shift + r * kLanes), keep + j * ldm + r * kLanes,
                                        r == R - 1 ? last : __mmask16(0xFFFF));
        lsum[r] = _mm512_add_ps(lsum[r], e);
      }
      _mm512_storeu_ps(et + j * kMaxRows + r * kLanes, e);
    }
}

template <int R, bool kRaw, bool kShifted, bool kMasked>
void score_piece(const float* qt, int64_t d, const float* k, int64_t ldk, int64_t width, const float* keep,
                 int64_t ldm, __mmask16 last, const float* shift, __m512* lsum, float* et) {
  const float* kp[kKeyTile];
  int64_t j = 0;
  for (; j + kKeyTile <= width; j += kKeyTile) {
    for (int t = 0; t < kKeyTile; ++t) kp[t] = k + (j + t) * ldk;
    score_tile<R, kKeyTile, kRaw, kShifted, kMasked>(qt, d, kp, keep + j * ldm, ldm, last, shift, lsum,
                                                     et + j * kMaxRows);
  }
  for (int t = 0; j + t < width; ++t) kp[t] = k + (j + t) * ldk;
  auto tail = [&](auto tile) { tile(qt, d, kp, keep + j * ldm, ldm, last, shift, lsum, et + j * kMaxRows); };
  switch (width - j) {
    case 5: tail(score_tile<R, 5, kRaw, kShifted, kMasked>); break;
    case 4: tail(score_tile<R, 4, kRaw, kShifted, kMasked>); break;
    case 3: tail(score_tile<R, 3, kRaw, kShifted, kMasked>); break;
    case 2: tail(score_tile<R, 2, kRaw, kShifted, kMasked>); break;
    case 1: tail(score_tile<R, 1, kRaw, kShifted, kMasked>); break;
    default: break;
  }
}

template <int R, int X>
inline void out_tile(const float* et, int64_t width, const float* v, int64_t ldv, float* ot) {
  __m512 acc[X][R];
  for (int x = 0; x < X; ++x)
    for (int r = 0; r < R; ++r) acc[x][r] = _mm512_loadu_ps(ot + x * kMaxRows + r * kLanes);
  for (int64_t j = 0; j < width; ++j) {
    __m512 ev[R];
    for (int r = 0; r < R; ++r) ev[r] = _mm512_loadu_ps(et + j * kMaxRows + r * kLanes);
    const float* vj = v + j * ldv;
    for (int x = 0; x < X; ++x) {
      const __m512 vb = _mm512_set1_ps(vj[x]);
      for (int r = 0; r < R; ++r) acc[x][r] = _mm512_fmadd_ps(vb, ev[r], acc[x][r]);
    }
  }
  for (int x = 0; x < X; ++x)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(ot + x * kMaxRows + r * kLanes, acc[x][r]);
}

// Keys in blocks of kOutKeys, all of O^T's columns per block: the block's E^T rows and v rows (16 KiB each) stay
// in L1 across the Dv / 6 passes instead of streaming from L2 on each.
constexpr int64_t kOutKeys = 64;

template <int R>
void out_piece(const float* et, int64_t width, const float* v, int64_t ldv, int64_t dv, float* ot) {
  for (int64_t j = 0; j < width; j += kOutKeys) {
    const int64_t n = std::min(kOutKeys, width - j);
    const float* e = et + j * kMaxRows;
    const float* vj = v + j * ldv;
    int64_t x = 0;
    for (; x + kOutTile <= dv; x += kOutTile) out_tile<R, kOutTile>(e, n, vj + x, ldv, ot + x * kMaxRows);
    // one tile for the remainder: single columns would load E^T once per 4 FMAs (64 = 10 * 6 + 4)
    switch (dv - x) {
      case 5: out_tile<R, 5>(e, n, vj + x, ldv, ot + x * kMaxRows); break;
      case 4: out_tile<R, 4>(e, n, vj + x, ldv, ot + x * kMaxRows); break;
      case 3: out_tile<R, 3>(e, n, vj + x, ldv, ot + x * kMaxRows); break;
      case 2: out_tile<R, 2>(e, n, vj + x, ldv, ot + x * kMaxRows); break;
      case 1: out_tile<R, 1>(e, n, vj + x, ldv, ot + x * kMaxRows); break;
      default: break;
    }
  }
}

// Query rows [t0, t0 + nr) of head h (nr <= 64) of one query block, as the generic forward_block does for all
// heads of a key head at once; mask points at the keep flags of row t0 (column c at + c * bq).
template <int R>
void rows_block(const float* q, const float* k, const float* v, int64_t t0, int64_t nr, int64_t h,
                const std::vector<Piece>& pieces, const float* mask, int64_t bq, bool shifted, float scale,
                const Layout& lay, float* out, float* m_out, float* l_out, Work& w) {
  const int64_t d = lay.d, dv = lay.dv, kvh = h / lay.g, ldk = d, ldv = dv;
  const __mmask16 last = static_cast<__mmask16>(nr % kLanes ? (1u << (nr % kLanes)) - 1u : 0xFFFFu);
  // The next block's q and out rows are 256 B pieces 2 KiB apart, read or written once: start fetching them now
  // (a miss on each cost as much as a tenth of the block's arithmetic).
  for (int64_t t = t0 + kMaxRows; t < std::min(t0 + 2 * kMaxRows, lay.tq); ++t) {
    const char* qn = reinterpret_cast<const char*>(q + t * lay.hq * d + h * d);
    const char* on = reinterpret_cast<const char*>(out + t * lay.hq * dv + h * dv);
    for (int64_t x = 0; x < d; x += kLanes) _mm_prefetch(qn + 4 * x, _MM_HINT_T1);
    for (int64_t x = 0; x < dv; x += kLanes) _mm_prefetch(on + 4 * x, _MM_HINT_ET1);
  }
  float* qt = w.qt.data();
  for (int64_t t = 0; t < R * kLanes; ++t)
    for (int64_t x = 0; x < d; ++x) qt[x * kMaxRows + t] = t < nr ? q[(t0 + t) * lay.hq * d + h * d + x] * scale : 0.f;
  std::fill(w.m, w.m + kMaxRows, shifted ? -std::numeric_limits<float>::infinity() : 0.f);
  std::fill(w.ot.begin(), w.ot.end(), 0.f);
  __m512 lsum[R];
  for (int r = 0; r < R; ++r) lsum[r] = _mm512_setzero_ps();
  const float* kbase = k;  // this key head's rows, gathered (HeadRows)
  const float* vbase = v;
  for (size_t lo = 0; lo < pieces.size();) {
    size_t hi = lo;
    int64_t cols = 0;
    while (hi < pieces.size() && cols + pieces[hi].width <= kChunk) cols += pieces[hi++].width;
    float* et = w.et.data();
    for (size_t p = lo; p < hi; et += pieces[p++].width * kMaxRows) {
      const Piece& pc = pieces[p];
      const float* kk = kbase + pc.key * ldk;
      const float* keep = pc.mask_col < 0 ? nullptr : mask + pc.mask_col * bq;
      if (shifted)
        (keep ? score_piece<R, true, true, true> : score_piece<R, true, true, false>)(
            qt, d, kk, ldk, pc.width, keep, bq, last, w.m, lsum, et);
      else
        (keep ? score_piece<R, false, false, true> : score_piece<R, false, false, false>)(
            qt, d, kk, ldk, pc.width, keep, bq, last, w.m, lsum, et);
    }
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
            const __m512 sv = _mm512_loadu_ps(et + r * kLanes), sh = _mm512_loadu_ps(w.m + r * kLanes);
            const __m512 e = keep ? exp_step<true, true>(sv, sh, keep + r * kLanes, lanes)
                                  : exp_step<true, false>(sv, sh, nullptr, lanes);
            _mm512_storeu_ps(et + r * kLanes, e);
            lsum[r] = _mm512_add_ps(lsum[r], e);
          }
    }
    et = w.et.data();
    for (size_t p = lo; p < hi; et += pieces[p++].width * kMaxRows)
      out_piece<R>(et, pieces[p].width, vbase + pieces[p].key * ldv, ldv, dv, w.ot.data());
    lo = hi;
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(w.l + r * kLanes, lsum[r]);
  for (int64_t t = 0; t < nr; ++t) {
    const int64_t row = (t0 + t) * lay.g + h % lay.g;
    float* dst = out + (t0 + t) * lay.hq * dv + h * dv;
    if (pieces.empty() || w.l[t] == 0.f) {  // no kept key (l = 0 exactly: a kept key weighs at least e^-40)
      std::fill(dst, dst + dv, 0.f);
      m_out[row] = 0.f;
      l_out[row] = 1.f;
    } else {
      const float inv = 1.f / w.l[t];
      for (int64_t x = 0; x < dv; ++x) dst[x] = w.ot[x * kMaxRows + t] * inv;
      m_out[row] = w.m[t];
      l_out[row] = w.l[t];
    }
  }
}

void forward_block(const float* q, const float* k, const float* v, const int64_t* item, const Piece* pieces_in,
                   const float* mask, int64_t mask_stride_h, int64_t bq, bool shifted, float scale, const Layout& lay,
                   int64_t kvh, float* out, float* m_out, float* l_out, std::vector<Piece>& pieces, Work& w) {
  split_pieces(item, pieces_in, pieces);
  for (int64_t h = kvh * lay.g; h < (kvh + 1) * lay.g; ++h)
    for (int64_t t0 = item[0]; t0 < item[0] + item[1]; t0 += kMaxRows) {
      const int64_t nr = std::min<int64_t>(kMaxRows, item[0] + item[1] - t0);
      const float* mk = mask ? mask + (mask_stride_h ? h * mask_stride_h : 0) + (t0 - item[0]) : nullptr;
      auto run = nr > 48 ? rows_block<4> : nr > 32 ? rows_block<3> : nr > 16 ? rows_block<2> : rows_block<1>;
      run(q, k, v, t0, nr, h, pieces, mk, bq, shifted, scale, lay, out, m_out, l_out, w);
    }
}

}  // namespace fast
#endif

void block_sparse_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& items,
                      const at::Tensor& pieces, const at::TensorList masks, const at::Tensor& shifted, double scale,
                      at::Tensor& out, at::Tensor& m, at::Tensor& l) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous() &&
                  m.is_contiguous() && l.is_contiguous(),
              "block_sparse_fwd: q, k, v, out, m, l must be contiguous");
  TORCH_CHECK(items.scalar_type() == at::kLong && pieces.scalar_type() == at::kLong &&
                  shifted.scalar_type() == at::kByte && items.is_contiguous() && pieces.is_contiguous(),
              "block_sparse_fwd: items / pieces must be contiguous int64, shifted uint8");
  const int64_t b = q.size(0), nitems = items.size(0);
  Layout lay{q.size(1), k.size(1), q.size(2), k.size(2), q.size(2) / k.size(2), q.size(3), v.size(3)};
  int64_t max_rows = 1;
  const int64_t* it = items.data_ptr<int64_t>();
  for (int64_t i = 0; i < nitems; ++i) max_rows = std::max(max_rows, it[i * 6 + 1]);
  const uint8_t* sh = shifted.data_ptr<uint8_t>();
  const Piece* pc = reinterpret_cast<const Piece*>(pieces.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "block_sparse_fwd", [&] {
    using T = scalar_t;
    std::vector<at::Tensor> mk(masks.begin(), masks.end());
    for (auto& x : mk) {
      TORCH_CHECK(x.numel() == 0 || (x.dim() == 5 && x.scalar_type() == q.scalar_type() && x.is_contiguous()),
                  "block_sparse_fwd: masks must be empty or contiguous [Bm, Gm, Hm, X, bq] of q's dtype");
    }
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    T* mp = m.data_ptr<T>();
    T* lp = l.data_ptr<T>();
    // tasks ordered (batch row, key head, query block): a thread's consecutive blocks share most of their keys
    at::parallel_for(0, b * lay.hkv * nitems, 1, [&](int64_t begin, int64_t end) {
      Work<T> w(max_rows * lay.g, lay.d, lay.dv);
      HeadRows<T> rows;
#if defined(__AVX512F__)
      std::unique_ptr<fast::Work> fw;
      if (std::is_same_v<T, float>) fw = std::make_unique<fast::Work>(lay.d, lay.dv);
#endif
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task % nitems, kvh = (task / nitems) % lay.hkv, bi = task / (nitems * lay.hkv);
        const int64_t* itm = it + i * 6;
        const T* mask = nullptr;
        int64_t stride_h = 0, bq = 0, cols = 0;
        const at::Tensor& mt = mk[itm[4]];
        if (mt.numel()) {
          const int64_t bm = mt.size(0), gm = mt.size(1), hm = mt.size(2);
          cols = mt.size(3);
          bq = mt.size(4);
          stride_h = hm > 1 ? bq * cols : 0;
          mask = mt.data_ptr<T>() + ((bm > 1 ? bi : 0) * gm + (gm > 1 ? itm[5] : 0)) * hm * bq * cols;
        }
        const int64_t qoff = bi * lay.tq * lay.hq * lay.d, ooff = bi * lay.tq * lay.hq * lay.dv;
        const T* kh = kp + bi * lay.tk * lay.d;  // one key head: its rows already are contiguous
        const T* vh = vp + bi * lay.tk * lay.dv;
        if (lay.hkv > 1) {
          rows.gather(kp, vp, bi * lay.hkv + kvh, lay);
          kh = rows.k.data();
          vh = rows.v.data();
        }
        const int64_t soff = (bi * lay.hkv + kvh) * lay.tq * lay.g;
#if defined(__AVX512F__)
        if (fw) {  // T is float
          fast::forward_block(reinterpret_cast<const float*>(qp + qoff), reinterpret_cast<const float*>(kh),
                              reinterpret_cast<const float*>(vh), itm, pc + itm[2],
                              reinterpret_cast<const float*>(mask), stride_h, bq, sh[i] != 0,
                              static_cast<float>(scale), lay, kvh, reinterpret_cast<float*>(op + ooff),
                              reinterpret_cast<float*>(mp + soff), reinterpret_cast<float*>(lp + soff), w.pieces, *fw);
          continue;
        }
#endif
        forward_block<T>(qp + qoff, kh, vh, itm, pc + itm[2], mask, stride_h, bq, cols, sh[i] != 0,
                         static_cast<T>(scale), lay, kvh, op + ooff, mp + soff, lp + soff, w);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridattn, m) {
  m.def("block_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor items, Tensor pieces, Tensor[] masks, "
        "Tensor shifted, float scale, Tensor(a!) out, Tensor(b!) m, Tensor(c!) l) -> ()");
}

TORCH_LIBRARY_IMPL(hybridattn, CPU, m) { m.impl("block_sparse_fwd", &block_sparse_fwd); }
