"""Sparse mask specs: sliding window, dilated, global tokens, Sparse Transformer, BigBird, block-sparse.

Each spec is a :class:`~hybridattn.ops.masks.MaskSpec`, so it works wherever ``softmax_attention(mask=...)``
takes one and composes with ``causal()``, ``padding()``, ``document()`` through ``&`` and ``|``. Besides the
``mask_mod`` (tensor operations only, so FlexAttention can vmap it), each spec gives closed forms for
``kept_pairs`` (``O(Tq + Tk)`` or ``O(nblocks^2)``) and ``block_layout`` (``O(nQ * nK)`` plus ``O(T)``), so a
kernel can plan its work without ever building ``Tq x Tk``.

Positions follow the causal convention of :mod:`hybridattn.ops.masks`: with ``Tq != Tk`` queries are aligned
bottom-right, so query row ``i`` sits at position ``p = i + Tk - Tq`` (the decode step of a KV cache is the last
position). ``d = p - j`` is the distance from query position ``p`` back to key ``j``.

Shape legend: B batch, H heads, Tq query length, Tk key length, nQ / nK query / key blocks.
"""

from __future__ import annotations

import torch

from hybridattn.ops._checks import check_positive_int, check_tensor
from hybridattn.ops.masks import MaskSpec, Reach, block_bounds, layout_from


def _layout_from(any_: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    out = layout_from(any_, full)
    return out.view(*([1] * (4 - out.dim())), *out.shape)


# ---------------------------------------------------------------------------------------------------------
# Specs defined by the distance d = p - j alone
# ---------------------------------------------------------------------------------------------------------
class _DistanceSpec(MaskSpec):
    """A spec whose decision depends only on ``d = p - j``. Subclasses implement ``keep(d)``.

    Within a (query block, key block) rectangle the distances form the contiguous range
    ``[q0 + off - k1, q1 + off - k0]``, so a prefix sum of ``keep`` over all distances answers "any kept?" and
    "all kept?" for every block in O(1), and ``kept_pairs`` is a sum over the ``Tq + Tk - 1`` distances.
    """

    def keep(self, d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_mod(self, q_len, kv_len):
        offset = kv_len - q_len
        return lambda b, h, q, k: self.keep(q + offset - k)

    def _distances(self, q_len, kv_len, device):
        offset = kv_len - q_len
        lo = offset - (kv_len - 1)
        # Tq = Tk = 0 gives the range [1, 0): no distance at all
        return lo, torch.arange(lo, max(lo, q_len + offset), device=device)

    def _kept_pairs(self, q_len, kv_len, block) -> int:
        offset = kv_len - q_len
        _, d = self._distances(q_len, kv_len, None)
        # rows i with j = i + offset - d inside [0, Tk): i in [max(0, d - offset), min(Tq, Tk + d - offset))
        count = torch.clamp(torch.clamp(kv_len + d - offset, max=q_len) - torch.clamp(d - offset, min=0), min=0)
        return int((count * self.keep(d)).sum())

    def _block_layout(self, q_len, kv_len, block_q, block_k, device):
        offset = kv_len - q_len
        lo, d = self._distances(q_len, kv_len, device)
        prefix = torch.nn.functional.pad(torch.cumsum(self.keep(d).long(), 0), (1, 0))
        q0, q1 = block_bounds(q_len, block_q, device)
        k0, k1 = block_bounds(kv_len, block_k, device)
        d_lo = (q0[:, None] + offset - k1[None, :]) - lo  # indices into d
        d_hi = (q1[:, None] + offset - k0[None, :]) - lo
        kept = prefix[d_hi + 1] - prefix[d_lo]
        return _layout_from(kept > 0, kept == d_hi - d_lo + 1)

    def reach(self):
        return Reach(relative=True)


class SlidingWindow(_DistanceSpec):
    """Query at position ``p`` sees keys ``p - left <= j <= p + right`` (Longformer / Mistral window)."""

    def __init__(self, left: int, right: int = 0):
        self.left = check_positive_int("left", left, allow_zero=True)
        self.right = check_positive_int("right", right, allow_zero=True)

    def keep(self, d):
        return (d <= self.left) & (d >= -self.right)

    def reach(self):
        return Reach(self.left, relative=True)

    def __repr__(self):
        return f"sliding_window({self.left}, {self.right})"


class Dilated(_DistanceSpec):
    """A sliding window that keeps only every ``dilation``-th key: ``-right <= d <= window`` and
    ``d % dilation == 0`` (Longformer's dilated window; ``dilation=1`` is ``sliding_window(window, right)``)."""

    def __init__(self, window: int, dilation: int, right: int = 0):
        self.window = check_positive_int("window", window, allow_zero=True)
        self.dilation = check_positive_int("dilation", dilation)
        self.right = check_positive_int("right", right, allow_zero=True)

    def keep(self, d):
        return (d <= self.window) & (d >= -self.right) & (d % self.dilation == 0)

    def reach(self):
        # the farthest kept distance (window itself when dilation divides it); the ones between stay masked
        return Reach(self.window - self.window % self.dilation, relative=True)

    def __repr__(self):
        return f"dilated({self.window}, {self.dilation}, right={self.right})"


class Strided(_DistanceSpec):
    """Sparse Transformer "strided" pattern (Child et al. 2019), both of its heads in one mask: the previous
    ``stride`` positions (``|d| < stride``) and every ``stride``-th one (``d % stride == 0``). Symmetric; use
    ``& causal()`` for the paper's autoregressive form."""

    def __init__(self, stride: int):
        self.stride = check_positive_int("stride", stride)

    def keep(self, d):
        return (d.abs() < self.stride) | (d % self.stride == 0)

    def __repr__(self):
        return f"strided({self.stride})"


# ---------------------------------------------------------------------------------------------------------
# Sparse Transformer "fixed" pattern
# ---------------------------------------------------------------------------------------------------------
class Fixed(MaskSpec):
    """Sparse Transformer "fixed" pattern: positions are cut into blocks of ``block``; a query sees its own
    block (``p // block == j // block``) and the last ``summary`` positions of every block
    (``j % block >= block - summary``). Symmetric; use ``& causal()`` for the autoregressive form."""

    def __init__(self, block: int, summary: int):
        self.block = check_positive_int("block", block)
        self.summary = check_positive_int("summary", summary, allow_zero=True)
        if summary > block:
            raise ValueError(f"summary: expected at most block={block} summary positions, received {summary}")

    def mask_mod(self, q_len, kv_len):
        offset, l, c = kv_len - q_len, self.block, self.summary
        return lambda b, h, q, k: ((q + offset) // l == k // l) | (k % l >= l - c)

    def _summaries_before(self, x: torch.Tensor) -> torch.Tensor:
        """Number of summary positions in ``[0, x)``."""
        l, c = self.block, self.summary
        return (x // l) * c + torch.clamp(x % l - (l - c), min=0)

    def _kept_pairs(self, q_len, kv_len, block) -> int:
        l = self.block
        p = torch.arange(q_len) + (kv_len - q_len)
        start = torch.clamp((p // l) * l, 0, kv_len)
        end = torch.clamp((p // l) * l + l, 0, kv_len)
        own = end - start
        own_summary = self._summaries_before(end) - self._summaries_before(start)
        total_summary = self._summaries_before(torch.tensor(kv_len))
        return int((own + total_summary - own_summary).sum())

    def _block_layout(self, q_len, kv_len, block_q, block_k, device):
        l, c, offset = self.block, self.summary, kv_len - q_len
        q0, q1 = block_bounds(q_len, block_q, device)
        k0, k1 = block_bounds(kv_len, block_k, device)
        ps, pe = (q0 + offset)[:, None], (q1 + offset)[:, None]
        k0, k1 = k0[None, :], k1[None, :]
        n_summary = self._summaries_before(k1 + 1) - self._summaries_before(k0)
        overlap = torch.maximum(ps // l, k0 // l) <= torch.minimum(pe // l, k1 // l)
        any_ = (n_summary > 0) | overlap
        # the non-summary keys of the block are contiguous from first_ns to last_ns; FULL needs them all in the
        # single position block of every query of the block
        first_ns = torch.where(k0 % l < l - c, k0, (k0 // l + 1) * l)
        last_ns = torch.where(k1 % l < l - c, k1, (k1 // l) * l + (l - c - 1))
        one_block = (ps // l == pe // l) & (first_ns // l == ps // l) & (last_ns // l == ps // l)
        full = (n_summary == k1 - k0 + 1) | one_block
        return _layout_from(any_, full)

    def __repr__(self):
        return f"fixed({self.block}, {self.summary})"


# ---------------------------------------------------------------------------------------------------------
# Global tokens
# ---------------------------------------------------------------------------------------------------------
class GlobalTokens(MaskSpec):
    """Tokens at ``indices`` (e.g. [CLS]) see every key and are seen by every query (Longformer's global
    attention). Indices past the current sequence are ignored, so one spec serves every length."""

    def __init__(self, indices):
        try:
            # positions are host-side metadata (like lengths), moved to the data's device where used: a default
            # device such as "meta" (model skeletons) must not capture them
            host = indices.device if isinstance(indices, torch.Tensor) else torch.device("cpu")
            idx = torch.as_tensor(indices, device=host)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"indices: expected a 1-D list or tensor of int positions, received {indices!r}") from None
        if idx.dim() != 1:
            raise ValueError(f"indices: expected a 1-D list of int positions, received shape {tuple(idx.shape)}")
        if idx.numel() == 0:
            idx = idx.long()  # an empty list is float to torch; no global token is a valid (empty) set
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"indices: expected int positions, received {idx.dtype} {idx.tolist()}")
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"indices: expected positions >= 0, received {idx.tolist()}")
        self.indices = torch.unique(idx.long())

    def _table(self, length: int, device) -> torch.Tensor:
        """``is_global`` for positions ``[0, length)`` plus one False slot for positions outside."""
        table = torch.zeros(length + 1, dtype=torch.bool, device=device)
        idx = self.indices[self.indices < length].to(device)
        table[idx] = True
        return table

    def mask_mod(self, q_len, kv_len):
        offset = kv_len - q_len
        length = max(kv_len, q_len + offset)
        table = self._table(length, None)

        def lookup(p):
            t = table.to(p.device)
            return t[torch.where((p >= 0) & (p < length), p, length)]

        return lambda b, h, q, k: lookup(q + offset) | lookup(k)

    def _counts(self, q_len, kv_len, block_q, block_k, device):
        offset = kv_len - q_len
        length = max(kv_len, q_len + offset)
        prefix = torch.nn.functional.pad(torch.cumsum(self._table(length, device)[:-1].long(), 0), (1, 0))

        def count(first, last):  # globals among positions [first, last], clamped to [0, length)
            first, last = torch.clamp(first, 0, length), torch.clamp(last + 1, 0, length)
            return torch.clamp(prefix[last] - prefix[first], min=0)

        q0, q1 = block_bounds(q_len, block_q, device)
        k0, k1 = block_bounds(kv_len, block_k, device)
        return count(q0 + offset, q1 + offset), q1 - q0 + 1, count(k0, k1), k1 - k0 + 1

    def _kept_pairs(self, q_len, kv_len, block) -> int:
        gq, _, gk, _ = self._counts(q_len, kv_len, max(q_len, 1), max(kv_len, 1), None)
        gq, gk = int(gq.sum()), int(gk.sum())
        return gq * kv_len + (q_len - gq) * gk

    def _block_layout(self, q_len, kv_len, block_q, block_k, device):
        gq, nq, gk, nk = self._counts(q_len, kv_len, block_q, block_k, device)
        any_ = (gq[:, None] > 0) | (gk[None, :] > 0)
        full = (gq == nq)[:, None] | (gk == nk)[None, :]
        return _layout_from(any_, full)

    def reach(self):
        pinned = tuple(self.indices.tolist())
        # other queries see the pinned keys only; a global query at g sees every key before it, at most g back
        return Reach(max(pinned, default=0), pinned)

    def __repr__(self):
        return f"global_tokens({self.indices.tolist()})"


# ---------------------------------------------------------------------------------------------------------
# Block-sparse layouts and BigBird
# ---------------------------------------------------------------------------------------------------------
class BlockSparse(MaskSpec):
    """A boolean layout over blocks of ``block`` positions: query position ``p`` sees key ``j`` when
    ``layout[..., p // block, j // block]``. ``layout`` is ``[nQb, nKb]``, ``[H, nQb, nKb]`` or
    ``[B, H, nQb, nKb]`` (size-1 batch / head dimensions broadcast) and must cover the positions used."""

    def __init__(self, layout: torch.Tensor, block: int = 128):
        check_tensor("layout", layout, floating=False)
        if layout.dtype != torch.bool:
            raise TypeError(f"layout: expected a torch.bool tensor (True = attend), received {layout.dtype}")
        if layout.dim() not in (2, 3, 4):
            raise ValueError(f"layout: expected [nQb, nKb], [H, nQb, nKb] or [B, H, nQb, nKb], received {tuple(layout.shape)}")
        self.block = check_positive_int("block", block)
        self.layout = layout.view(*([1] * (4 - layout.dim())), *layout.shape)
        self.batch_size = self.layout.shape[0] if self.layout.shape[0] != 1 else None
        self.num_heads = self.layout.shape[1] if self.layout.shape[1] != 1 else None

    def _layout(self, q_len: int, kv_len: int) -> torch.Tensor:
        # bottom-right alignment puts every query position in [Tk - Tq, Tk), so Tk decides both sides
        n_q = n_k = -(-kv_len // self.block)
        if self.layout.shape[-2] < n_q or self.layout.shape[-1] < n_k:
            raise ValueError(
                f"layout: expected at least ({n_q}, {n_k}) blocks of {self.block} to cover Tq={q_len}, Tk={kv_len}, "
                f"received {tuple(self.layout.shape[-2:])}"
            )
        return self.layout

    def mask_mod(self, q_len, kv_len):
        layout, offset, bs = self._layout(q_len, kv_len), kv_len - q_len, self.block
        nb, nh = layout.shape[:2]

        def mod(b, h, q, k):
            p = q + offset
            lay = layout.to(q.device)
            return lay[b % nb, h % nh, torch.clamp(p, min=0) // bs, k // bs] & (p >= 0)

        return mod

    def _tokens_per_block(self, first: int, length: int, n_blocks: int, device) -> torch.Tensor:
        """How many of the positions ``[first, first + length)`` fall in each layout block."""
        start = torch.arange(n_blocks, device=device) * self.block
        lo = torch.clamp(start, min=first)
        hi = torch.clamp(start + self.block, max=first + length)
        return torch.clamp(hi - lo, min=0)

    def _kept_pairs(self, q_len, kv_len, block) -> int:
        layout = self._layout(q_len, kv_len)
        nq = self._tokens_per_block(kv_len - q_len, q_len, layout.shape[-2], None)
        nk = self._tokens_per_block(0, kv_len, layout.shape[-1], None)
        return int((layout.cpu().long() * nq[:, None] * nk[None, :]).sum())

    def _block_layout(self, q_len, kv_len, block_q, block_k, device):
        layout, offset, bs = self._layout(q_len, kv_len).to(device), kv_len - q_len, self.block
        prefix = torch.nn.functional.pad(layout.long().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        q0, q1 = block_bounds(q_len, block_q, device)
        k0, k1 = block_bounds(kv_len, block_k, device)
        ps, pe = q0 + offset, q1 + offset
        # layout rows [qa, qb); the clamp only matters at Tk = 0, where every query sits before position 0 and a
        # 0-block layout has no row 1
        qa = torch.clamp(ps, min=0) // bs
        qb = torch.clamp(torch.clamp(pe, min=0) // bs + 1, max=layout.shape[-2])
        ka, kb = k0 // bs, k1 // bs + 1
        rect = (prefix[..., qb, :][..., kb] - prefix[..., qa, :][..., kb]
                - prefix[..., qb, :][..., ka] + prefix[..., qa, :][..., ka])
        area = (qb - qa)[:, None] * (kb - ka)[None, :]
        any_ = (rect > 0) & (pe >= 0)[:, None]
        full = (rect == area) & (ps >= 0)[:, None]
        return _layout_from(any_, full)

    def __repr__(self):
        return f"block_sparse(layout={tuple(self.layout.shape)}, block={self.block})"


_MASK32, _GOLDEN32 = 0xFFFFFFFF, 0x9E3779B9


def _mix32(x):
    """A non-linear 32-bit integer hash (T. Mueller's two rounds of xorshift-multiply, constant 0x45D9F3B): a
    flipped input bit changes about half the output bits. The affine hash it replaces gave scores
    ``frac(a r + b c + s)``, which put a row's random blocks at a fixed gap and made a seed shift every score alike.

    Works on Python ints and on int64 tensors holding values in ``[0, 2^32)``: a 32-bit value times a 27-bit
    constant stays below 2^59, so int64 never overflows, and right shifts of non-negative values are logical."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


class BigBird(BlockSparse):
    """BigBird (Zaheer et al. 2020) over blocks of ``block`` positions: each query block sees ``window``
    neighbouring blocks on each side, the first ``n_global`` blocks are global (see and are seen by every
    block), and each other query block sees ``n_random`` extra key blocks. Symmetric; combine with
    ``& causal()`` for a decoder, and pass ``causal=True`` so that random blocks are drawn among past blocks only
    (otherwise causal masking drops the future ones).

    Random blocks come from a hash of ``(seed, query block, key block)``, so a row's choice does not depend on
    the sequence length as long as its candidates exist; with ``causal=True`` every row is fixed once its
    candidates (the blocks before it) exist, which keeps incremental decoding equal to a full forward."""

    def __init__(self, window: int = 1, n_global: int = 1, n_random: int = 2, block: int = 64, seed: int = 0,
                 *, causal: bool = False):
        self.window = check_positive_int("window", window, allow_zero=True)
        self.n_global = check_positive_int("n_global", n_global, allow_zero=True)
        self.n_random = check_positive_int("n_random", n_random, allow_zero=True)
        self.block = check_positive_int("block", block)
        self.seed = check_positive_int("seed", seed, allow_zero=True)
        self.causal = bool(causal)
        self._layouts: dict[int, torch.Tensor] = {}

    def _random_scores(self, n_blocks: int) -> torch.Tensor:
        """``int64 [n_blocks, n_blocks]`` scores in ``[0, 2^32)``: a hash of (seed, query block, key block) that
        depends on nothing else, so a row's draw is fixed once its candidates exist (the causal prefix property).
        Chained ``_mix32`` rounds: the seed, then the row, then the column; each round is a bijection of 32-bit
        values, so within a row distinct columns get distinct scores (no ties, so ``topk`` is deterministic)."""
        h, seed = _GOLDEN32, self.seed
        while True:  # fold the seed in 32 bits at a time, so that every seed gives its own stream
            h = _mix32(h ^ (seed & _MASK32))
            seed >>= 32
            if not seed:
                break
        idx = torch.arange(n_blocks, dtype=torch.int64)
        row = _mix32(idx ^ h)
        return _mix32(row[:, None] ^ idx[None, :])

    def layout_for(self, n_blocks: int) -> torch.Tensor:
        """The ``[1, 1, n_blocks, n_blocks]`` block layout (cached per ``n_blocks``)."""
        if n_blocks not in self._layouts:
            idx = torch.arange(n_blocks)
            lay = (idx[:, None] - idx[None, :]).abs() <= self.window
            lay |= (idx[:, None] < self.n_global) | (idx[None, :] < self.n_global)
            if self.n_random and n_blocks:
                score = self._random_scores(n_blocks)
                taken = lay | (idx[None, :] > idx[:, None]) if self.causal else lay
                score[taken] = -1  # draw only among blocks not seen yet (and, causal, not in the future)
                top = score.topk(min(self.n_random, n_blocks), dim=-1)
                chosen = torch.zeros_like(lay).scatter_(-1, top.indices, top.values >= 0)
                chosen[: self.n_global] = False  # global rows already see everything
                lay |= chosen
            self._layouts[n_blocks] = lay.view(1, 1, n_blocks, n_blocks)
        return self._layouts[n_blocks]

    def _layout(self, q_len, kv_len):
        return self.layout_for(-(-kv_len // self.block))

    def reach(self):
        # drawn among all blocks, a row's random blocks change as later blocks appear
        return Reach(prefix_stable=self.causal)

    def __repr__(self):
        return (f"bigbird(window={self.window}, n_global={self.n_global}, n_random={self.n_random}, "
                f"block={self.block}, seed={self.seed}, causal={self.causal})")


# ---------------------------------------------------------------------------------------------------------
# Constructors (re-exported from hybridattn.ops.masks)
# ---------------------------------------------------------------------------------------------------------
def sliding_window(left: int, right: int = 0) -> MaskSpec:
    """Keys within ``left`` positions before and ``right`` after the query (``right=0``: causal window)."""
    return SlidingWindow(left, right)


def dilated(window: int, dilation: int, right: int = 0) -> MaskSpec:
    """Every ``dilation``-th key within ``window`` positions before (``right`` after) the query."""
    return Dilated(window, dilation, right)


def global_tokens(indices) -> MaskSpec:
    """Tokens at ``indices`` attend to everything and are attended by everything."""
    return GlobalTokens(indices)


def strided(stride: int) -> MaskSpec:
    """Sparse Transformer strided pattern: the previous ``stride`` keys and every ``stride``-th key."""
    return Strided(stride)


def fixed(block: int, summary: int) -> MaskSpec:
    """Sparse Transformer fixed pattern: the query's own block and the last ``summary`` keys of every block."""
    return Fixed(block, summary)


def bigbird(window: int = 1, n_global: int = 1, n_random: int = 2, block: int = 64, seed: int = 0, *,
            causal: bool = False) -> MaskSpec:
    """BigBird: ``window`` neighbour blocks, ``n_global`` global blocks, ``n_random`` random blocks per row
    (drawn among past blocks with ``causal=True``; still combine with ``& causal()``)."""
    return BigBird(window, n_global, n_random, block, seed, causal=causal)


def block_sparse(layout: torch.Tensor, block: int = 128) -> MaskSpec:
    """An explicit boolean block layout ``[nQb, nKb]`` / ``[H, ...]`` / ``[B, H, ...]`` over ``block`` positions."""
    return BlockSparse(layout, block)


def longformer(window: int, global_indices) -> MaskSpec:
    """Longformer: a symmetric window of ``window`` keys on each side, plus global tokens."""
    return SlidingWindow(window, window) | GlobalTokens(global_indices)
