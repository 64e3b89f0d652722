// The block-sparse softmax attention backward on a CPU, one (batch row, key head) per task.
//
// Same arithmetic as ops/block_sparse_attention.py::_BlockSparseSoftmax.backward (read its docstring): per query
// block, E = exp(scale q k^T - m) (clamped to [-EXP_SAFE, EXP_SAFE] where the forward shifted the block, plain
// exp where it did not) times the tile mask, l = rowsum(E) and delta from this E, then
//   do' = do / l,   dp = do' v^T,   delta = rowsum(E * dp) / l,   ds = E * (dp - delta),
//   dv += E^T do',  dq = scale ds k,  dk += scale ds^T q.
// Why: the PyTorch loop issues ~15 small torch ops per query block; at T = 16K with a 512-key window its
// element-wise ops and Python took ~40% of a backward 5x as long as the forward. Here each block is five BLAS
// GEMMs and three vectorised passes over its tile (fwd + bwd 0.55-0.68 of the loop's time).
//
// A task owns a contiguous segment of the query blocks of one (batch row, key head). The first segment
// accumulates its dk / dv rows (GEMMs with beta = 1) straight into the outputs; the others into zeroed buffers of
// their own key range, added in segment order once every task is done. A (batch row, key head) is one segment when
// there are at least kMinTasks of them; with fewer (B = 1 with MQA or few key heads) it is split into up to
// kMinTasks / pairs segments of about equal work, so that every thread gets some. The split depends on the sizes
// only, never on the thread count: any number of threads gives the same bits. A block's whole tile is kept (S and
// dP, rows x its keys: 4 MiB each for 64 global rows at T = 16K), since l and delta need the full row before any
// gradient. Plan, masks and the saved row shift are the forward's (block_sparse.cpp); shifted [N] says which
// blocks took the shift.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "block_sparse.h"
#include "simd_exp.h"
#include "work_sharing.h"

namespace {

using namespace hybridattn_csrc;
using namespace hybridattn_csrc::sparse;

template <typename T>
struct BackwardWork {  // one thread's buffers, reused for every query block it owns
  std::vector<T> q, dout, s, dp, dq;
  std::vector<Piece> pieces;
  BackwardWork(int64_t rows, int64_t width, int64_t d, int64_t dv)
      : q(rows * d), dout(rows * dv), s(rows * width), dp(rows * width), dq(rows * d) {}
};

// s <- exp(s - m) clamped to [-EXP_SAFE, EXP_SAFE] where the block was shifted, exp(s) elsewhere (its logits are
// bounded by EXP_SAFE): as _weights in ops/block_sparse_attention.py. AVX-512 float: 16 at a time (std::exp is a
// scalar libm call that gcc does not vectorise; it made this backward slower than the PyTorch loop).
template <typename T>
inline void exp_shifted(T* s, int64_t n, T m, bool shifted) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 lo = _mm512_set1_ps(-float(kExpSafe)), hi = _mm512_set1_ps(float(kExpSafe)), mv = _mm512_set1_ps(m);
    for (int64_t x = 0; x < n; x += 16) {
      const __mmask16 lanes = n - x >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - x)) - 1u);
      __m512 y = _mm512_maskz_loadu_ps(lanes, s + x);
      if (shifted) y = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(y, mv), lo), hi);
      _mm512_mask_storeu_ps(s + x, lanes, exp16_in_range(y));
    }
    return;
  }
#endif
  for (int64_t x = 0; x < n; ++x)
    s[x] = shifted ? std::exp(std::min(std::max(s[x] - m, T(-kExpSafe)), T(kExpSafe))) : std::exp(s[x]);
}

// Where a task adds its dk / dv rows: key row `key` of its key head at dk + (key - key0) * ldk (and so for dv).
template <typename T>
struct KeyGrads {
  T* dk;
  T* dv;
  int64_t ldk, ldv, key0;
};

// Strides of the output gradient [B, Tq, Hq, Dv], read as given: autograd hands `out.sum()`'s gradient over as
// an expanded tensor (all strides 0), and a contiguous copy would cost a full output's worth of memory.
struct GradStrides {
  int64_t b, t, h, x;
};

template <typename T>
void backward_block(const T* q, const T* k, const T* v, const T* dout, const GradStrides& gs, const int64_t* item,
                    const Piece* pieces_in, const T* mask, int64_t mask_stride_h, int64_t bq, bool shifted,
                    const T* m_rows, T scale, const Layout& lay, int64_t kvh, int64_t width, T* dq,
                    const KeyGrads<T>& kg, BackwardWork<T>& w) {
  const int64_t start = item[0], rows = item[1], g = lay.g, n = rows * g, d = lay.d, dvn = lay.dv;
  const int64_t ldq = lay.hq * d, ldk = lay.hkv * d, ldv = lay.hkv * dvn;
  const T* kh = k + kvh * d;
  const T* vh = v + kvh * dvn;
  // rows in (t, g) order, contiguous: the G query heads of a key head are extra rows of one GEMM
  T* qb = w.q.data();
  T* ob = w.dout.data();
  for (int64_t t = 0; t < rows; ++t) {
    std::copy_n(q + (start + t) * ldq + kvh * g * d, g * d, qb + t * g * d);
    for (int64_t j = 0; j < g; ++j) {
      const T* src = dout + (start + t) * gs.t + (kvh * g + j) * gs.h;
      T* dst = ob + (t * g + j) * dvn;
      if (gs.x == 1)
        std::copy_n(src, dvn, dst);
      else
        for (int64_t x = 0; x < dvn; ++x) dst[x] = src[x * gs.x];
    }
  }
  split_pieces(item, pieces_in, w.pieces);
  if (w.pieces.empty()) {  // a block that keeps no key: its rows attended nothing, dq = 0, nothing else to add
    for (int64_t t = 0; t < rows; ++t) std::fill_n(dq + (start + t) * ldq + kvh * g * d, g * d, T(0));
    return;
  }
  T* s = w.s.data();
  T* dp = w.dp.data();
  // S = scale q k^T and dP = do v^T over the block's keys (do' = do / l is applied per row below)
  for_key_runs(w.pieces, 0, w.pieces.size(), [&](int64_t key, int64_t wd, int64_t col) {
    mm<T>(false, true, n, wd, d, scale, qb, d, kh + key * ldk, ldk, T(0), s + col, width);
    mm<T>(false, true, n, wd, dvn, T(1), ob, dvn, vh + key * ldv, ldv, T(0), dp + col, width);
  });
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t j = 0; j < g; ++j) {
      const int64_t r = t * g + j;
      T* sr = s + r * width;
      T* dpr = dp + r * width;
      // E = exp(s - m) as _weights computes it: clamped where the block was shifted, plain exp elsewhere
      const T m = shifted ? m_rows[(start + t) * g + j] : T(0);
      exp_shifted(sr, width, m, shifted);
      const T* keep_row = mask ? mask + (mask_stride_h ? (kvh * g + j) * mask_stride_h : 0) + t : nullptr;
      int64_t c = 0;
      for (const Piece& pc : w.pieces) {
        if (pc.mask_col >= 0) {
          const T* keep = keep_row + pc.mask_col * bq;  // a key's flags are bq apart (column-major masks)
          for (int64_t x = 0; x < pc.width; ++x) sr[c + x] *= keep[x * bq];
        }
        c += pc.width;
      }
      // sums in double: ~600 float terms summed in order drifted past the tests' 1e-5 on one gradient
      double l = 0;
#pragma omp simd reduction(+ : l)
      for (int64_t x = 0; x < width; ++x) l += sr[x];
      // a row that keeps no key (l = 0) attended nothing: no gradient flows through it
      const T inv = l == 0 ? T(0) : T(1.0 / l);
      double sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t x = 0; x < width; ++x) {
        dpr[x] *= inv;  // dp = do' v^T
        sum += double(sr[x]) * double(dpr[x]);
      }
      const T delta = T(sum) * inv;
#pragma omp simd
      for (int64_t x = 0; x < width; ++x) {
        dpr[x] = sr[x] * (dpr[x] - delta);  // ds
        sr[x] *= inv;                       // E / l, so that dv += (E / l)^T do = E^T do'
      }
    }
  // dv += (E / l)^T do, dk += scale ds^T q (rows no other task writes), dq = scale ds k
  for_key_runs(w.pieces, 0, w.pieces.size(), [&](int64_t key, int64_t wd, int64_t col) {
    mm<T>(true, false, wd, dvn, n, T(1), s + col, width, ob, dvn, T(1), kg.dv + (key - kg.key0) * kg.ldv, kg.ldv);
    mm<T>(true, false, wd, d, n, scale, dp + col, width, qb, d, T(1), kg.dk + (key - kg.key0) * kg.ldk, kg.ldk);
    mm<T>(false, false, n, d, wd, scale, dp + col, width, kh + key * ldk, ldk, col == 0 ? T(0) : T(1), w.dq.data(),
          d);
  });
  for (int64_t t = 0; t < rows; ++t) std::copy_n(w.dq.data() + t * g * d, g * d, dq + (start + t) * ldq + kvh * g * d);
}

// Fewer (batch row, key head) pairs than this and each is split into segments of query blocks (see the top).
constexpr int64_t kMinTasks = 8;

// The query blocks [begin[s], begin[s + 1]) of each segment, of about equal work (rows x keys), and the key rows
// [key_lo[s], key_hi[s]) that segment s > 0 adds to, kept at offset[s] of a pair's per_pair partial elements
// (dk rows, then dv rows).
struct Segments {
  int64_t count = 1, per_pair = 0;
  std::vector<int64_t> begin, key_lo, key_hi, offset;
  Segments(const int64_t* it, const Piece* pc, const std::vector<int64_t>& widths, int64_t nitems, int64_t pairs,
           const Layout& lay) {
    if (pairs < kMinTasks) count = std::max<int64_t>(1, std::min(nitems, (kMinTasks + pairs - 1) / pairs));
    double total = 0;
    for (int64_t i = 0; i < nitems; ++i) total += double(it[i * 6 + 1]) * double(widths[i]);
    begin.assign(count + 1, nitems);
    begin[0] = 0;
    double done = 0;
    int64_t s = 1;
    for (int64_t i = 0; i < nitems && s < count; ++i) {
      done += double(it[i * 6 + 1]) * double(widths[i]);
      // at least one block per segment: the cut comes no later than leaves one block for each segment after it
      if (done >= total * double(s) / double(count) || nitems - (i + 1) == count - s) begin[s++] = i + 1;
    }
    key_lo.assign(count, 0);
    key_hi.assign(count, 0);
    offset.assign(count, 0);
    for (s = 1; s < count; ++s) {
      int64_t lo = lay.tk, hi = 0;
      for (int64_t i = begin[s]; i < begin[s + 1]; ++i)
        for (int64_t p = it[i * 6 + 2]; p < it[i * 6 + 3]; ++p) {
          lo = std::min(lo, pc[p].key);
          hi = std::max(hi, pc[p].key + pc[p].width);
        }
      key_lo[s] = std::min(lo, hi);
      key_hi[s] = hi;
      offset[s] = per_pair;
      per_pair += (key_hi[s] - key_lo[s]) * (lay.d + lay.dv);
    }
  }
};

void block_sparse_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                      const at::Tensor& items, const at::Tensor& pieces, const at::TensorList masks,
                      const at::Tensor& shifted, const at::Tensor& shift, double scale, at::Tensor& dq, at::Tensor& dk,
                      at::Tensor& dv) {
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&q, &k, &v, &shift, &dq, &dk, &dv}) {
    TORCH_CHECK(x->is_contiguous() && x->scalar_type() == q.scalar_type(),
                "block_sparse_bwd: q, k, v, shift, dq, dk, dv must be contiguous and of one dtype");
  }
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && dout.dim() == 4 && dout.size(0) == q.size(0) &&
                  dout.size(1) == q.size(1) && dout.size(2) == q.size(2) && dout.size(3) == v.size(3),
              "block_sparse_bwd: dout must be [B, Tq, Hq, Dv] of q's dtype");
  const GradStrides gs{dout.stride(0), dout.stride(1), dout.stride(2), dout.stride(3)};
  TORCH_CHECK(items.scalar_type() == at::kLong && pieces.scalar_type() == at::kLong &&
                  shifted.scalar_type() == at::kByte && items.is_contiguous() && pieces.is_contiguous() &&
                  shifted.is_contiguous() && shifted.numel() == items.size(0),
              "block_sparse_bwd: items / pieces must be contiguous int64, shifted one uint8 per item");
  const int64_t b = q.size(0), nitems = items.size(0);
  const Layout lay{q.size(1), k.size(1), q.size(2), k.size(2), q.size(2) / k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(shift.numel() == b * lay.hkv * lay.tq * lay.g, "block_sparse_bwd: shift must be [B, Hkv, Tq * G, 1]");
  const int64_t* it = items.data_ptr<int64_t>();
  const Piece* pc = reinterpret_cast<const Piece*>(pieces.data_ptr<int64_t>());
  const uint8_t* sh = shifted.data_ptr<uint8_t>();
  std::vector<int64_t> widths(nitems);
  int64_t max_rows = 1, max_width = 1;
  for (int64_t i = 0; i < nitems; ++i) {
    const int64_t* itm = it + i * 6;
    for (int64_t p = itm[2]; p < itm[3]; ++p) widths[i] += pc[p].width;
    max_rows = std::max(max_rows, itm[1]);
    max_width = std::max(max_width, widths[i]);
  }
  const Segments seg(it, pc, widths, nitems, b * lay.hkv, lay);
  dk.zero_();
  dv.zero_();
  // segments after the first add into these (zeroed: a GEMM with beta = 1 reads them), [pairs, seg.per_pair]
  at::Tensor partial = at::zeros({b * lay.hkv * seg.per_pair}, dk.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "block_sparse_bwd", [&] {
    using T = scalar_t;
    const std::vector<at::Tensor> mk = checked_masks(masks, q.scalar_type(), "block_sparse_bwd");
    const int64_t qn = lay.tq * lay.hq * lay.d;
    const int64_t kn = lay.tk * lay.hkv * lay.d, vn = lay.tk * lay.hkv * lay.dv;
    T* dkp = dk.data_ptr<T>();
    T* dvp = dv.data_ptr<T>();
    T* part = partial.data_ptr<T>();
    auto make_work = [&] { return BackwardWork<T>(max_rows * lay.g, max_width, lay.d, lay.dv); };
    // one task per (batch row, key head, segment): the rows it adds dk / dv to are its own
    parallel_tasks(b * lay.hkv * seg.count, make_work, [&](BackwardWork<T>& w, int64_t task) {
      const int64_t pair = task / seg.count, s = task % seg.count;
      const int64_t bi = pair / lay.hkv, kvh = pair % lay.hkv;
      const T* m_rows = shift.data_ptr<T>() + pair * lay.tq * lay.g;
      KeyGrads<T> kg{dkp + bi * kn + kvh * lay.d, dvp + bi * vn + kvh * lay.dv, lay.hkv * lay.d, lay.hkv * lay.dv, 0};
      if (s > 0) {
        T* own = part + pair * seg.per_pair + seg.offset[s];
        const int64_t rows = seg.key_hi[s] - seg.key_lo[s];
        kg = KeyGrads<T>{own, own + rows * lay.d, lay.d, lay.dv, seg.key_lo[s]};
      }
      for (int64_t i = seg.begin[s]; i < seg.begin[s + 1]; ++i) {
        const int64_t* itm = it + i * 6;
        ItemMask im;
        const T* mask = im.at<T>(mk, itm, bi);
        backward_block<T>(q.data_ptr<T>() + bi * qn, k.data_ptr<T>() + bi * kn, v.data_ptr<T>() + bi * vn,
                          dout.data_ptr<T>() + bi * gs.b, gs, itm, pc + itm[2], mask, im.stride_h, im.bq, sh[i] != 0,
                          m_rows, static_cast<T>(scale), lay, kvh, std::max<int64_t>(widths[i], 1),
                          dq.data_ptr<T>() + bi * qn, kg, w);
      }
    });
    if (seg.count == 1) return;
    // each key row adds the segments' rows in segment order, whichever thread does it
    at::parallel_for(0, b * lay.hkv * lay.tk, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t pair = r / lay.tk, key = r % lay.tk, bi = pair / lay.hkv, kvh = pair % lay.hkv;
        T* dkr = dkp + bi * kn + key * lay.hkv * lay.d + kvh * lay.d;
        T* dvr = dvp + bi * vn + key * lay.hkv * lay.dv + kvh * lay.dv;
        for (int64_t s = 1; s < seg.count; ++s) {
          if (key < seg.key_lo[s] || key >= seg.key_hi[s]) continue;
          const T* own = part + pair * seg.per_pair + seg.offset[s];
          const int64_t row = key - seg.key_lo[s], rows = seg.key_hi[s] - seg.key_lo[s];
          for (int64_t x = 0; x < lay.d; ++x) dkr[x] += own[row * lay.d + x];
          for (int64_t x = 0; x < lay.dv; ++x) dvr[x] += own[rows * lay.d + row * lay.dv + x];
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridattn, m) {
  m.def("block_sparse_bwd(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor items, Tensor pieces, Tensor[] masks, "
        "Tensor shifted, Tensor shift, float scale, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()");
}

TORCH_LIBRARY_IMPL(hybridattn, CPU, m) {
  m.impl("block_sparse_bwd", &block_sparse_bwd);
}
