// What the block-sparse forward's two paths share (block_sparse.cpp: the generic BLAS path; block_sparse_avx512.h:
// the float register tiles): the plan's pieces, one call's layout, and the exp bound.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace hybridattn_csrc::sparse {

// As ops/block_sparse_attention.py EXP_SAFE: shifted logits are clamped to [-40, 0], so kept keys weigh at least
// e^-40 (never subnormal) and the backward, which clamps the same way, recomputes the same weights; unshifted
// blocks have every logit bounded by it.
constexpr double kExpSafe = 40.0;
// Columns of S per pass: a 64-row block's S stays in L2 however many keys the block reads (global tokens' rows
// read all of them); longer key lists take several passes with the online-softmax rescale.
constexpr int64_t kChunk = 1024;

// Keys [key, key + width) of one query block: fully kept (mask_col -1) or masked by mask columns
// [mask_col, mask_col + width).
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

// Calls fn(key, width, col) for each maximal run of pieces in p[lo, hi) whose keys are contiguous, so that each
// run is one GEMM: its first key, its total width and its first column in the tile (counted from p[lo]).
template <typename F>
inline void for_key_runs(const std::vector<Piece>& p, size_t lo, size_t hi, F fn) {
  int64_t col = 0;
  while (lo < hi) {
    size_t end = lo + 1;
    int64_t width = p[lo].width;
    while (end < hi && p[end].key == p[end - 1].key + p[end - 1].width) width += p[end++].width;
    fn(p[lo].key, width, col);
    col += width;
    lo = end;
  }
}

// One call's masks, checked: masks[group] is empty (the group has no masked piece) or [Bm, Gm, Hm, X, bq],
// contiguous, in the compute dtype.
inline std::vector<at::Tensor> checked_masks(at::TensorList masks, at::ScalarType dtype, const char* op) {
  std::vector<at::Tensor> mk(masks.begin(), masks.end());
  for (const auto& x : mk) {
    TORCH_CHECK(x.numel() == 0 || (x.dim() == 5 && x.scalar_type() == dtype && x.is_contiguous()), op,
                ": masks must be empty or contiguous [Bm, Gm, Hm, X, bq] of q's dtype");
  }
  return mk;
}

// The keep flags of item itm (plan row: q_start, rows, piece_begin, piece_end, group, mask_row) in batch row bi:
// row 0, column 0 of its first head's plane, or nullptr where its group has no mask. Column c of row t is at
// + t + c * bq; query head h's plane at + h * stride_h (stride_h 0: one plane for all heads).
struct ItemMask {
  int64_t stride_h = 0, bq = 0, cols = 0;
  template <typename T>
  const T* at(const std::vector<at::Tensor>& mk, const int64_t* itm, int64_t bi) {
    const at::Tensor& mt = mk[itm[4]];
    if (!mt.numel()) return nullptr;
    const int64_t bm = mt.size(0), gm = mt.size(1), hm = mt.size(2);
    cols = mt.size(3);
    bq = mt.size(4);
    stride_h = hm > 1 ? bq * cols : 0;
    return mt.data_ptr<T>() + ((bm > 1 ? bi : 0) * gm + (gm > 1 ? itm[5] : 0)) * hm * bq * cols;
  }
};

struct Layout {  // sizes and strides of one call
  int64_t tq, tk, hq, hkv, g, d, dv;
  // the float path writes whole output lines with streaming stores (see kStreamOutBytes in block_sparse.cpp)
  bool stream_out = false;
};

}  // namespace hybridattn_csrc::sparse
