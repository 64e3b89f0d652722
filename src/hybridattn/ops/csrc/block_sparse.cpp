// The block-sparse softmax attention forward on a CPU, one (batch row, key head, query block) per task.
//
// Same algorithm and saved statistics as ops/block_sparse_attention.py::_BlockSparseSoftmax.forward (read its
// docstring); why it exists: there every step of a query block is a separate torch op on a [H, 64, ~600] tile
// (matmul, exp, mask multiply, row sum, division) -- about ten passes over the tile through op dispatch, all
// batched over heads, so a second core gets tiles too small to split. Here a thread takes whole query blocks,
// runs S = Q K^T and E V on one key head's contiguous rows (KeyHeads) -- register tiles for float32 with AVX-512
// (block_sparse_avx512.h), single-threaded BLAS otherwise -- and does the exp, the mask and the row sum in one
// pass over S while it is in L1 / L2. Threads start on contiguous shares of the tasks and, when done, take tasks
// left in the others' (work_sharing.h).
//
// Plan (built once per BlockPlan by block_sparse_plan.py::native_layout): items [N, 6] per query block
// (q_start, rows, piece_begin, piece_end, group, mask_row) and pieces [P, 3] (key_start, width, mask_col): the
// block's keys as contiguous ranges, each either fully kept (mask_col -1, no masking) or masked by columns
// [mask_col, mask_col + width) of masks[group] [Bm, Gm, Hm, bq, X] (0 / 1 in the compute dtype; row mask_row of
// its G dimension).
//
// Outputs, written in place: out [B, Tq, Hq, Dv]; m, l [B, Hkv, Tq * G] (row shift and row sum, rows in (t, g)
// order: the backward's input); shifted [N] (uint8, zeroed by the caller): 1 where any rows of the block took the
// row-max shift. The kernel decides it from its own norms (scale |q| |k| bounds the logits, as _shift_needed does
// for the PyTorch loop): per query head and 64 rows in the float path, per key head and block in the generic one;
// rows left unshifted keep m = 0. Rows that keep no key get out = 0, m = 0, l = 1 (finite for the backward, which
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
#include <mutex>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <type_traits>
#include <vector>

#include "blas.h"
#include "block_sparse.h"
#include "block_sparse_avx512.h"
#include "work_sharing.h"

namespace {

using namespace hybridattn_csrc;
using namespace hybridattn_csrc::sparse;

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

template <typename T>
struct Work {  // one thread's buffers, reused for every query block it owns
  std::vector<T> q, s, o, m, l;
  std::vector<Piece> pieces;
  Work(int64_t rows, int64_t d, int64_t dv) : q(rows * d), s(rows * kChunk), o(rows * dv), m(rows), l(rows) {}
};

template <typename T>
inline T squared_norm(const T* row, int64_t d) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < d; ++j) sum += row[j] * row[j];
  return sum;
}

// Asks Linux to back [p, p + bytes) with 2 MiB pages where it can (a hint only): the output is freshly mapped
// memory, and faulting it in 4 KiB at a time cost ~12 ms per 32 MiB on the machines we measured.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Each key head's k and v rows made contiguous ([B, Hkv, Tk, D] and [B, Hkv, Tk, Dv]) in one pass before the
// tasks run, with the norms |k_t| [B, Hkv, Tk] that decide which blocks need the row-max shift. Why: in
// [B, T, H, D] a head's rows lie H * D * 4 bytes apart (2 KiB at H = 8, D = 64); tiles reading 64 such rows in
// place map them onto a few L1 sets and thrash (the Longformer forward ran ~30% slower), and per-head gathers
// read them strided (~15% of the call). One pass reads k and v front to back instead. The buffer is kept across
// calls (fresh pages cost ~1.5 us each to fault in on the machines we measured: 12 ms for 32 MiB), up to
// kKeepBytes; a call that finds it in use by another thread, or needs more, allocates its own. A single key
// head's rows already are contiguous: then only the norms are computed.
template <typename T>
class KeyHeads {
 public:
  static constexpr size_t kKeepBytes = size_t(512) << 20;

  KeyHeads(const T* kp, const T* vp, const Layout& lay, int64_t b)
      : lay_(lay), kp_(kp), vp_(vp), lock_(shared().busy, std::try_to_lock),
        buf_(lock_.owns_lock() ? shared().buf : own_) {
    const bool copy = lay.hkv > 1;
    const size_t rows = b * lay.hkv * lay.tk, nk = copy ? rows * lay.d : 0, nv = copy ? rows * lay.dv : 0;
    buf_.reserve(nk + nv + rows);
    k_ = buf_.data;
    v_ = k_ + nk;
    norms_ = v_ + nv;
    at::parallel_for(0, b * lay.tk, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bi = r / lay.tk, t = r % lay.tk;
        for (int64_t h = 0; h < lay.hkv; ++h) {
          const T* ks = kp + (r * lay.hkv + h) * lay.d;
          const int64_t row = (bi * lay.hkv + h) * lay.tk + t;
          norms_[row] = std::sqrt(squared_norm(ks, lay.d));
          if (!copy) continue;
          const T* vs = vp + (r * lay.hkv + h) * lay.dv;
          copy_row(ks, k_ + row * lay.d, lay.d);
          copy_row(vs, v_ + row * lay.dv, lay.dv);
        }
      }
#if defined(__AVX512F__)
      _mm_sfence();  // the streaming stores are visible before the tasks read the rows
#endif
    });
  }
  ~KeyHeads() {
    if (buf_.size * sizeof(T) > kKeepBytes) buf_ = Buffer();
  }
  // rows of key head bh = (batch row, key head)
  const T* k(int64_t bh) const { return (lay_.hkv > 1 ? k_ : kp_) + bh * lay_.tk * lay_.d; }
  const T* v(int64_t bh) const { return (lay_.hkv > 1 ? v_ : vp_) + bh * lay_.tk * lay_.dv; }
  // bytes held between calls (the bench adds them to the forward's peak: torch's profiler does not see them)
  static size_t kept_bytes() {
    std::lock_guard<std::mutex> guard(shared().busy);
    return shared().buf.size * sizeof(T);
  }
  // the largest |k_t| over the block's keys
  T max_norm(int64_t bh, const int64_t* item, const Piece* pieces) const {
    const T* nr = norms_ + bh * lay_.tk;
    T best = 0;
    for (int64_t p = item[2]; p < item[3]; ++p) {
      const Piece& pc = pieces[p - item[2]];
#pragma omp simd reduction(max : best)
      for (int64_t t = pc.key; t < pc.key + pc.width; ++t) best = std::max(best, nr[t]);
    }
    return best;
  }

 private:
  // One row copied; float rows of whole cache lines with streaming stores: the buffer is far larger than the
  // caches, so the plain stores' read-for-ownership of each line would be a third of the pass's memory traffic.
  static void copy_row(const T* src, T* dst, int64_t n) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      if (n % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
        for (int64_t x = 0; x < n; x += 16) _mm512_stream_ps(dst + x, _mm512_loadu_ps(src + x));
        return;
      }
    }
#endif
    for (int64_t x = 0; x < n; ++x) dst[x] = src[x];  // a loop, not std::copy: no libc call per row
  }
  struct Buffer {  // uninitialised until the pass writes it, so that the huge-page hint comes before any fault
    static constexpr size_t kAlign = 64 / sizeof(T);  // elements: rows of whole lines start on a line
    std::unique_ptr<T[]> storage;
    T* data = nullptr;
    size_t size = 0;
    void reserve(size_t n) {
      if (n <= size) return;
      storage.reset(new T[n + kAlign]);
      const uintptr_t at = reinterpret_cast<uintptr_t>(storage.get());
      data = storage.get() + (((at + 63) & ~uintptr_t(63)) - at) / sizeof(T);
      size = n;
      advise_huge_pages(data, n * sizeof(T));
    }
  };
  struct Shared {
    std::mutex busy;
    Buffer buf;
  };
  static Shared& shared() {
    static Shared s;
    return s;
  }
  Layout lay_;
  const T* kp_;
  const T* vp_;
  std::unique_lock<std::mutex> lock_;
  Buffer own_;
  Buffer& buf_;
  T* k_ = nullptr;
  T* v_ = nullptr;
  T* norms_ = nullptr;
};

// The largest |q| over rows [start, start + rows) of the G query heads of key head kvh (generic path).
template <typename T>
T max_query_norm(const T* q, int64_t start, int64_t rows, int64_t kvh, const Layout& lay) {
  T best = 0;
  for (int64_t t = start; t < start + rows; ++t)
    for (int64_t j = 0; j < lay.g; ++j)
      best = std::max(best, squared_norm(q + t * lay.hq * lay.d + (kvh * lay.g + j) * lay.d, lay.d));
  return std::sqrt(best);
}

template <typename T>
void forward_block(const T* q, const T* k, const T* v, const int64_t* item, const Piece* pieces_in,
                   const T* mask, int64_t mask_stride_h, int64_t bq, int64_t mask_cols, bool shifted, T scale,
                   const Layout& lay, int64_t kvh, T* out, T* m_out, T* l_out, Work<T>& w) {
  const int64_t start = item[0], rows = item[1], g = lay.g, n = rows * g, d = lay.d, dv = lay.dv;
  const int64_t ldq = lay.hq * d, ldk = d, ldv = dv, ldo = lay.hq * dv;  // k, v: one head's rows (KeyHeads)
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
    for_key_runs(w.pieces, lo, hi, [&](int64_t key, int64_t width, int64_t col) {
      mm<T>(false, true, n, width, d, scale, qb, ldqb, k + key * ldk, ldk, T(0), s + col, kChunk);
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
    for_key_runs(w.pieces, lo, hi, [&](int64_t key, int64_t width, int64_t col) {
      mm<T>(false, false, n, dv, width, T(1), s + col, kChunk, v + key * ldv, ldv, first ? T(0) : T(1), o, dv);
      first = false;
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

// From this size on, the output is written with streaming stores: it is fresh memory, far larger than the caches,
// so plain stores would first read every line they write (the Longformer forward at T = 16K, 32 MiB of output,
// ran ~4% faster). A smaller output stays cached for whatever reads it next.
constexpr int64_t kStreamOutBytes = int64_t(16) << 20;

void block_sparse_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& items,
                      const at::Tensor& pieces, const at::TensorList masks, at::Tensor& shifted, double scale,
                      at::Tensor& out, at::Tensor& m, at::Tensor& l) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous() &&
                  m.is_contiguous() && l.is_contiguous(),
              "block_sparse_fwd: q, k, v, out, m, l must be contiguous");
  TORCH_CHECK(items.scalar_type() == at::kLong && pieces.scalar_type() == at::kLong &&
                  shifted.scalar_type() == at::kByte && items.is_contiguous() && pieces.is_contiguous(),
              "block_sparse_fwd: items / pieces must be contiguous int64, shifted uint8");
  TORCH_CHECK(shifted.is_contiguous() && shifted.numel() == items.size(0),
              "block_sparse_fwd: shifted must hold one uint8 per item");
  const int64_t b = q.size(0), nitems = items.size(0);
  Layout lay{q.size(1), k.size(1), q.size(2), k.size(2), q.size(2) / k.size(2), q.size(3), v.size(3)};
  lay.stream_out = out.numel() * out.element_size() >= kStreamOutBytes;
  int64_t max_rows = 1;
  const int64_t* it = items.data_ptr<int64_t>();
  for (int64_t i = 0; i < nitems; ++i) max_rows = std::max(max_rows, it[i * 6 + 1]);
  uint8_t* sh = shifted.data_ptr<uint8_t>();
  const Piece* pc = reinterpret_cast<const Piece*>(pieces.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "block_sparse_fwd", [&] {
    using T = scalar_t;
    const std::vector<at::Tensor> mk = checked_masks(masks, q.scalar_type(), "block_sparse_fwd");
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    T* mp = m.data_ptr<T>();
    T* lp = l.data_ptr<T>();
    advise_huge_pages(op, out.numel() * sizeof(T));
    const KeyHeads<T> heads(kp, vp, lay, b);
    struct State {
      Work<T> w;
#if defined(__AVX512F__)
      std::unique_ptr<avx512::Work> fw;
      std::vector<avx512::Span> spans;
#endif
    };
    auto make_state = [&] {
      State st{Work<T>(max_rows * lay.g, lay.d, lay.dv)};
#if defined(__AVX512F__)
      if (std::is_same_v<T, float>) st.fw = std::make_unique<avx512::Work>(lay.d, lay.dv);
#endif
      return st;
    };
    // tasks ordered (batch row, key head, query block): a thread's consecutive blocks share most of their keys
    parallel_tasks(b * lay.hkv * nitems, make_state, [&](State& st, int64_t task) {
      Work<T>& w = st.w;
      const int64_t i = task % nitems, kvh = (task / nitems) % lay.hkv, bi = task / (nitems * lay.hkv);
      const int64_t* itm = it + i * 6;
      ItemMask im;
      const T* mask = im.at<T>(mk, itm, bi);
      const int64_t stride_h = im.stride_h, bq = im.bq, cols = im.cols;
      const int64_t qoff = bi * lay.tq * lay.hq * lay.d, ooff = bi * lay.tq * lay.hq * lay.dv;
      const int64_t bh = bi * lay.hkv + kvh, soff = bh * lay.tq * lay.g;
      const T* kh = heads.k(bh);
      const T* vh = heads.v(bh);
      // the row-max shift only where a logit may leave [-EXP_SAFE, EXP_SAFE] (|s| <= scale |q| |k|), decided per
      // task (per head and 64 rows in the float path, from the norms its Q^T packing sums); the backward learns
      // which blocks have any such rows
      const T kmax = heads.max_norm(bh, itm, pc + itm[2]);
#if defined(__AVX512F__)
      if (st.fw) {  // T is float
        const bool shift = avx512::forward_block(
            reinterpret_cast<const float*>(qp + qoff), reinterpret_cast<const float*>(kh),
            reinterpret_cast<const float*>(vh), lay.d, lay.dv, itm, pc + itm[2], reinterpret_cast<const float*>(mask),
            stride_h, bq, static_cast<float>(kmax), static_cast<float>(scale), lay, kvh,
            reinterpret_cast<float*>(op + ooff), reinterpret_cast<float*>(mp + soff),
            reinterpret_cast<float*>(lp + soff), w.pieces, st.spans, *st.fw);
        if (shift) __atomic_store_n(sh + i, uint8_t(1), __ATOMIC_RELAXED);
        if (lay.stream_out) _mm_sfence();  // this task's streaming stores are visible when the call returns
        return;
      }
#endif
      const bool shift = std::abs(scale) * double(max_query_norm(qp + qoff, itm[0], itm[1], kvh, lay)) *
                             double(kmax) > kExpSafe;
      if (shift) __atomic_store_n(sh + i, uint8_t(1), __ATOMIC_RELAXED);
      forward_block<T>(qp + qoff, kh, vh, itm, pc + itm[2], mask, stride_h, bq, cols, shift,
                       static_cast<T>(scale), lay, kvh, op + ooff, mp + soff, lp + soff, w);
    });
  });
}

int64_t block_sparse_workspace_bytes() {
  return static_cast<int64_t>(KeyHeads<float>::kept_bytes() + KeyHeads<double>::kept_bytes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridattn, m) {
  m.def("block_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor items, Tensor pieces, Tensor[] masks, "
        "Tensor(d!) shifted, float scale, Tensor(a!) out, Tensor(b!) m, Tensor(c!) l) -> ()");
  m.def("block_sparse_workspace_bytes() -> int", &block_sparse_workspace_bytes);
}

TORCH_LIBRARY_IMPL(hybridattn, CPU, m) {
  m.impl("block_sparse_fwd", &block_sparse_fwd);
}
