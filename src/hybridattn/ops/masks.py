"""Mask specs: which (query, key) pairs may interact, described once and used by every backend.

A spec is lazy: nothing of size ``Tq x Tk`` is built unless a backend asks for it. Each spec can

(a) ``dense(q_len, kv_len)``: materialise a boolean mask ``[B|1, H|1, Tq, Tk]`` (True = attend) for the
    naive reference and SDPA;
(b) ``kept_pairs(q_len, kv_len)``: count the pairs it keeps (per batch row and head, summed);
(c) ``block_layout(q_len, kv_len, block_q, block_k)``: an ``int8`` tensor ``[B|1, H|1, nQ, nK]`` with
    ``EMPTY`` (skip the block), ``PARTIAL`` (apply the mask) or ``FULL`` (no mask needed), for kernels that skip
    work; computed one query block at a time, so memory stays ``O(block_q * Tk)``;
(d) ``mask_mod(q_len, kv_len)``: a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` built from
    tensor operations only;
(e) ``reach()``: a :class:`Reach`, how far back a causal query sees and which positions stay visible, which sizes
    a decoder's KV cache.

Specs combine with ``&`` and ``|``. Causal masks with ``Tq != Tk`` are aligned bottom-right, as flash-attn does:
query ``i`` sees keys ``j <= i + Tk - Tq``. Rows and columns are positions; :func:`at_positions` evaluates a spec
at other positions (a KV cache's slots once a row is left-padded or a ring buffer dropped old keys).

Shape legend: B batch, H heads, Tq query length, Tk key length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hybridattn.ops._checks import check_cu_seqlens, check_positive_int, check_tensor

EMPTY, PARTIAL, FULL = 0, 1, 2

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Reach:
    """How a spec uses token positions, which decides what a causal decoder's KV cache must keep.

    Attributes:
        lookback: every kept pair ``(p, j)``, ``j <= p``, whose key is not pinned has ``p - j <= lookback``;
            None = unbounded (the cache keeps every key).
        pinned: key positions that later queries may see however far back (global tokens).
        relative: the decision depends on ``p - j`` alone (windows, dilated, strided, causal), so shifting every
            position by one amount changes nothing.
        prefix_stable: the decision at ``(p, j)`` does not depend on the sequence length: the spec on ``N``
            positions agrees with the spec on a longer sequence. Decoding token by token relies on it, and so does
            evaluating a left-padded row at its own positions. False for tensors, padding, documents and a BigBird
            drawn with ``causal=False``.
    """

    lookback: int | None = None
    pinned: tuple[int, ...] = ()
    relative: bool = False
    prefix_stable: bool = True

    def slots(self) -> int | None:
        """KV entries a cache needs: ``lookback + 1`` plus the pinned ones; None when unbounded."""
        return None if self.lookback is None else self.lookback + 1 + len(self.pinned)

    def __and__(self, other: "Reach") -> "Reach":
        # a pair kept by A & B is kept by A and by B, so either side's bound holds: take the smaller cache
        bound = self
        if other.lookback is not None and (self.lookback is None or other.slots() < self.slots()):
            bound = other
        return Reach(bound.lookback, bound.pinned, self.relative and other.relative,
                     self.prefix_stable and other.prefix_stable)

    def __or__(self, other: "Reach") -> "Reach":
        bounded = self.lookback is not None and other.lookback is not None
        return Reach(max(self.lookback, other.lookback) if bounded else None,
                     tuple(sorted(set(self.pinned) | set(other.pinned))) if bounded else (),
                     self.relative and other.relative, self.prefix_stable and other.prefix_stable)


class MaskSpec:
    """Base class. Subclasses implement ``mask_mod`` and may override ``_kept_pairs`` / ``_block_layout`` with
    closed forms; the public methods check the lengths and block sizes once, for every spec."""

    #: batch size the spec depends on (e.g. padding lengths), or None when it is the same for every row
    batch_size: int | None = None
    #: head count the spec depends on, or None when it is the same for every head
    num_heads: int | None = None

    def mask_mod(self, q_len: int, kv_len: int) -> MaskMod:
        raise NotImplementedError

    def reach(self) -> Reach:
        """How far back a causal query sees (see :class:`Reach`). This default (unbounded, prefix-stable) is what
        a user's spec gets; specs that know better override it."""
        return Reach()

    # -- derived forms -------------------------------------------------------------------------------------
    def _index_grid(self, q_idx: torch.Tensor, kv_idx: torch.Tensor, device):
        """``(b, h, q, k)`` index tensors for ``mask_mod``: ``b`` ``[B|1, 1, 1...]`` and ``h`` ``[1, H|1, 1...]``
        lead, ``q_idx`` / ``kv_idx`` (of one rank, broadcastable against each other, e.g. ``[n, 1]`` / ``[1, m]``)
        follow, so a mask_mod's result is ``[B|1, H|1, n, m]``."""
        tail = (1,) * q_idx.dim()
        b = torch.arange(self.batch_size or 1, device=device).view(-1, 1, *tail)
        h = torch.arange(self.num_heads or 1, device=device).view(1, -1, *tail)
        return b, h, q_idx[None, None], kv_idx[None, None]

    def _dense_at(self, q_len: int, kv_len: int, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """The mask at query rows ``q_idx`` and key columns ``kv_idx`` (index tensors of one rank, broadcastable
        against each other, all in range): ``[B|1, H|1, *broadcast shape]``. ``dense``, ``dense_rows``,
        ``dense_block`` and a composition's ``kept_pairs`` (a batch of PARTIAL tiles) all evaluate through here."""
        b, h, qi, ki = self._index_grid(q_idx, kv_idx, q_idx.device)
        out = self.mask_mod(q_len, kv_len)(b, h, qi, ki)
        # by hand: torch.broadcast_shapes imports sympy on first use (a second of start-up)
        grid = tuple(a if b == 1 else b for a, b in zip(q_idx.shape, kv_idx.shape))
        return out.to(torch.bool).expand(self.batch_size or 1, self.num_heads or 1, *grid)

    def dense_block(self, q_len: int, kv_len: int, q_start: int, q_end: int, k_start: int, k_end: int, *,
                    device=None) -> torch.Tensor:
        """The tile ``[q_start:q_end, k_start:k_end]`` of the dense mask, ``[B|1, H|1, q_end - q_start,
        k_end - k_start]``; tiled kernels ask for PARTIAL tiles only, so cost follows the kept blocks."""
        device = torch.device("cpu") if device is None else torch.device(device)
        q_idx = torch.arange(q_start, q_end, device=device)
        kv_idx = torch.arange(k_start, k_end, device=device)
        return self._dense_at(q_len, kv_len, q_idx[:, None], kv_idx[None, :])

    def dense_rows(self, q_len: int, kv_len: int, q_start: int, q_end: int, *, device=None) -> torch.Tensor:
        """Rows ``q_start:q_end`` of the dense mask, ``[B|1, H|1, q_end - q_start, Tk]``."""
        return self.dense_block(q_len, kv_len, q_start, q_end, 0, kv_len, device=device)

    def dense(self, q_len: int, kv_len: int, *, device=None) -> torch.Tensor:
        """The whole boolean mask, ``[B|1, H|1, Tq, Tk]`` (True = attend)."""
        _check_lengths(q_len, kv_len)
        return self.dense_rows(q_len, kv_len, 0, q_len, device=device)

    def kept_pairs(self, q_len: int, kv_len: int, *, block: int = 256) -> int:
        """Number of kept pairs, summed over the batch rows and heads the spec depends on (``dense(...).sum()``).
        ``block`` bounds the rows materialised at once where a spec has no cheaper count."""
        _check_lengths(q_len, kv_len)
        check_positive_int("block", block)
        return self._kept_pairs(q_len, kv_len, block)

    def block_layout(self, q_len: int, kv_len: int, block_q: int, block_k: int, *, device=None) -> torch.Tensor:
        """``int8 [B|1, H|1, ceil(Tq/block_q), ceil(Tk/block_k)]`` of EMPTY / PARTIAL / FULL."""
        _check_lengths(q_len, kv_len)
        check_positive_int("block_q", block_q)
        check_positive_int("block_k", block_k)
        return self._block_layout(q_len, kv_len, block_q, block_k, device)

    # -- generic forms from the dense mask, for specs without a closed form ---------------------------------
    def _kept_pairs(self, q_len: int, kv_len: int, block: int) -> int:
        total = 0
        for start in range(0, q_len, block):
            total += int(self.dense_rows(q_len, kv_len, start, min(q_len, start + block)).sum())
        return total

    def _block_layout(self, q_len: int, kv_len: int, block_q: int, block_k: int, device) -> torch.Tensor:
        n_kb = -(-kv_len // block_k)
        pad_k = n_kb * block_k - kv_len
        rows = [torch.zeros(self.batch_size or 1, self.num_heads or 1, 0, n_kb, dtype=torch.int8, device=device)]
        for start in range(0, q_len, block_q):
            m = self.dense_rows(q_len, kv_len, start, min(q_len, start + block_q), device=device)
            if pad_k:
                # padding keys count as "masked" for EMPTY but must not make a block PARTIAL on their own
                m = torch.nn.functional.pad(m, (0, pad_k), value=False)
                valid = torch.zeros(n_kb * block_k, dtype=torch.bool, device=m.device)
                valid[:kv_len] = True
            else:
                valid = None
            m = m.unflatten(-1, (n_kb, block_k))  # [B, H, bq, nK, block_k]
            anyk = m.any(dim=-1).any(dim=-2)
            if valid is None:
                allk = m.all(dim=-1).all(dim=-2)
            else:
                allk = (m | ~valid.view(n_kb, block_k)).all(dim=-1).all(dim=-2)
            rows.append(torch.where(allk, FULL, torch.where(anyk, PARTIAL, EMPTY)).to(torch.int8)[:, :, None])
        return torch.cat(rows, dim=-2)

    # -- combinators ---------------------------------------------------------------------------------------
    def __and__(self, other: "MaskSpec") -> "MaskSpec":
        return _Combined(self, as_mask_spec(other, "other"), "and")

    def __or__(self, other: "MaskSpec") -> "MaskSpec":
        return _Combined(self, as_mask_spec(other, "other"), "or")

    def __rand__(self, other):
        return as_mask_spec(other, "other") & self

    def __ror__(self, other):
        return as_mask_spec(other, "other") | self


def _check_lengths(q_len, kv_len) -> None:
    check_positive_int("q_len", q_len, allow_zero=True)
    check_positive_int("kv_len", kv_len, allow_zero=True)


def block_bounds(length: int, block: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index of each block of ``block`` positions covering ``[0, length)``."""
    start = torch.arange(0, length, block, device=device)
    return start, torch.clamp(start + block, max=length) - 1


def layout_from(any_: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """EMPTY / PARTIAL / FULL codes from "some pair kept" and "every pair kept" tile flags."""
    return torch.where(full, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)


def _merge_dim(name: str, a: int | None, b: int | None) -> int | None:
    if a is None or b is None or a == b:
        return a if b is None else b
    raise ValueError(f"mask: cannot combine specs with {name} {a} and {b}")


class _Combined(MaskSpec):
    def __init__(self, left: MaskSpec, right: MaskSpec, op: str):
        self.left, self.right, self.op = left, right, op
        self.batch_size = _merge_dim("batch size", left.batch_size, right.batch_size)
        self.num_heads = _merge_dim("head count", left.num_heads, right.num_heads)

    def mask_mod(self, q_len, kv_len):
        f, g = self.left.mask_mod(q_len, kv_len), self.right.mask_mod(q_len, kv_len)
        if self.op == "and":
            return lambda b, h, q, k: f(b, h, q, k) & g(b, h, q, k)
        return lambda b, h, q, k: f(b, h, q, k) | g(b, h, q, k)

    def _block_layout(self, q_len, kv_len, block_q, block_k, device):
        a = self.left.block_layout(q_len, kv_len, block_q, block_k, device=device)
        c = self.right.block_layout(q_len, kv_len, block_q, block_k, device=device)
        # AND: empty if either is empty, full only if both are full; OR: the dual. PARTIAL is conservative.
        return torch.minimum(a, c) if self.op == "and" else torch.maximum(a, c)

    def reach(self):
        a, b = self.left.reach(), self.right.reach()
        return a & b if self.op == "and" else a | b

    def _kept_pairs(self, q_len, kv_len, block):
        # No closed form for a composition, but its block layout has one: FULL tiles count by their area, EMPTY
        # ones are skipped and only PARTIAL ones evaluate the mask, so the cost follows the tiles that are not EMPTY.
        # A band-like mask has O(T / tile) PARTIAL tiles of tile^2 pairs against (T / tile)^2 layout entries, which
        # balance near tile = T^(1/3); the layout is kept under 2^22 entries.
        tile = 16
        while tile ** 3 < max(q_len, kv_len) or -(-q_len // tile) * -(-kv_len // tile) > 1 << 22:
            tile *= 2
        tq, tk = max(1, min(tile, q_len)), max(1, min(tile, kv_len))  # a decode step (Tq = 1) needs 1-row tiles
        layout = self.block_layout(q_len, kv_len, tq, tk)
        layout = layout.expand(self.batch_size or 1, self.num_heads or 1, *layout.shape[2:]).flatten(0, 1)
        rows = torch.clamp(q_len - torch.arange(layout.shape[-2]) * tq, max=tq)  # the last tile may be ragged
        cols = torch.clamp(kv_len - torch.arange(layout.shape[-1]) * tk, max=tk)
        partial = (layout == PARTIAL).any(0)  # (nQ, nK): evaluated for every batch row and head at once
        n_full = (layout == FULL).sum(0)
        total = int((n_full * rows[:, None] * cols[None, :])[~partial].sum())
        tiles = partial.nonzero()  # (N, 2)
        per_chunk = max(1, (1 << 22) // (layout.shape[0] * tq * tk))  # bounds the mask held at once
        for chunk in tiles.split(per_chunk):
            q_idx = chunk[:, 0, None] * tq + torch.arange(tq)  # (n, tq), past Tq in a ragged tile
            k_idx = chunk[:, 1, None] * tk + torch.arange(tk)
            valid = (q_idx < q_len)[:, :, None] & (k_idx < kv_len)[:, None, :]
            keep = self._dense_at(q_len, kv_len, q_idx.clamp(max=q_len - 1)[:, :, None],
                                  k_idx.clamp(max=kv_len - 1)[:, None, :])
            total += int((keep & valid).sum())
        return total

    def __repr__(self):
        return f"({self.left!r} {'&' if self.op == 'and' else '|'} {self.right!r})"


class TensorMask(MaskSpec):
    """A user's boolean tensor broadcastable to ``[B, H, Tq, Tk]`` (2 to 4 dimensions) wrapped as a spec."""

    def __init__(self, mask: torch.Tensor):
        check_tensor("mask", mask, floating=False)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a torch.bool tensor (True = attend), received {mask.dtype}")
        if not 2 <= mask.dim() <= 4:
            raise ValueError(f"mask: expected 2 to 4 dimensions broadcastable to [B, H, Tq, Tk], received shape "
                             f"{tuple(mask.shape)}")
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # missing leading dims broadcast
        self.mask = mask
        self.batch_size = mask.shape[0] if mask.shape[0] != 1 else None
        self.num_heads = mask.shape[1] if mask.shape[1] != 1 else None

    def _check_lengths(self, q_len, kv_len):
        tq, tk = self.mask.shape[-2:]
        if tq not in (1, q_len) or tk not in (1, kv_len):
            raise ValueError(
                f"mask: expected the last two dimensions broadcastable to (Tq={q_len}, Tk={kv_len}), "
                f"received {tuple(self.mask.shape)}"
            )

    def mask_mod(self, q_len, kv_len):
        self._check_lengths(q_len, kv_len)
        m = self.mask.expand(self.mask.shape[0], self.mask.shape[1], q_len, kv_len)
        nb, nh = m.shape[:2]
        return lambda b, h, q, k: m[b % nb, h % nh, q, k]

    def dense_block(self, q_len, kv_len, q_start, q_end, k_start, k_end, *, device=None):
        # a view of the user's tensor (no copy through mask_mod's gather), moved only once sliced
        self._check_lengths(q_len, kv_len)
        m = self.mask.expand(self.mask.shape[0], self.mask.shape[1], q_len, kv_len)
        m = m[:, :, q_start:q_end, k_start:k_end]
        return m if device is None else m.to(device)

    def reach(self):
        return Reach(prefix_stable=False)  # its shape is one (Tq, Tk)

    def __repr__(self):
        return f"TensorMask(shape={tuple(self.mask.shape)})"


class Causal(MaskSpec):
    """Query ``i`` sees keys ``j <= i + Tk - Tq`` (bottom-right aligned)."""

    def mask_mod(self, q_len, kv_len):
        offset = kv_len - q_len
        return lambda b, h, q, k: (q + offset) >= k

    def _kept_pairs(self, q_len, kv_len, block) -> int:
        offset = kv_len - q_len
        return sum(max(0, min(kv_len, i + offset + 1)) for i in range(q_len))

    def _block_layout(self, q_len, kv_len, block_q, block_k, device):
        offset = kv_len - q_len
        q0, q1 = block_bounds(q_len, block_q, device)
        k0, k1 = block_bounds(kv_len, block_k, device)
        out = layout_from((q1[:, None] + offset) >= k0[None, :], (q0[:, None] + offset) >= k1[None, :])
        return out.view(1, 1, *out.shape)

    def reach(self):
        return Reach(relative=True)

    def __repr__(self):
        return "causal"


class Padding(MaskSpec):
    """Keys at positions ``>= lengths[b]`` are padding; ``lengths`` is ``[B]``."""

    def __init__(self, lengths):
        if not isinstance(lengths, torch.Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.is_floating_point():
            raise ValueError(f"lengths: expected an integer tensor [B], received {lengths.dtype} {tuple(lengths.shape)}")
        self.lengths = lengths
        self.batch_size = lengths.shape[0]

    def mask_mod(self, q_len, kv_len):
        if int(self.lengths.max()) > kv_len or int(self.lengths.min()) < 0:
            raise ValueError(f"lengths: expected values in [0, Tk={kv_len}], received {self.lengths.tolist()}")
        lengths = self.lengths
        return lambda b, h, q, k: k < lengths.to(k.device)[b]

    def _kept_pairs(self, q_len, kv_len, block) -> int:
        self.mask_mod(q_len, kv_len)  # validates the lengths
        return q_len * int(self.lengths.sum())

    def _block_layout(self, q_len, kv_len, block_q, block_k, device):
        self.mask_mod(q_len, kv_len)
        k0, k1 = block_bounds(kv_len, block_k, device)
        n_q = -(-q_len // block_q)
        lengths = self.lengths.to(k0.device)[:, None]
        out = layout_from(k0[None, :] < lengths, k1[None, :] < lengths)  # (B, nK), the same for every query
        return out[:, None, None, :].expand(-1, 1, n_q, -1)

    def reach(self):
        return Reach(prefix_stable=False)  # lengths of one sequence

    def __repr__(self):
        return f"padding({self.lengths.tolist()})"


class Document(MaskSpec):
    """Packed sequences (``cu_seqlens`` as in flash-attn): tokens attend only within their own document.
    Requires ``Tq == Tk == cu_seqlens[-1]``; with several batch rows every row has these same boundaries (pass
    rows of other layouts as separate calls, or one packed row of B = 1 as flash-attn does)."""

    def __init__(self, cu_seqlens):
        if not isinstance(cu_seqlens, torch.Tensor):
            try:
                cu_seqlens = torch.as_tensor(cu_seqlens)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(
                    f"cu_seqlens: expected a list or tensor of int offsets, received {cu_seqlens!r}"
                ) from None
        # the spec's length is its last offset: read it only once the shape is known to be [N + 1], and let
        # check_cu_seqlens report a bad shape (an impossible total of -1 never gets past its shape check)
        well_shaped = cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2
        check_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]) if well_shaped else -1, batch=1)
        self.cu_seqlens = cu_seqlens.to(torch.long)
        total = int(cu_seqlens[-1])
        self.doc_ids = torch.searchsorted(self.cu_seqlens[1:], torch.arange(total), right=True)

    def mask_mod(self, q_len, kv_len):
        total = int(self.cu_seqlens[-1])
        if q_len != total or kv_len != total:
            raise ValueError(
                f"cu_seqlens: expected Tq == Tk == cu_seqlens[-1] = {total}, received Tq={q_len}, Tk={kv_len}"
            )
        ids = self.doc_ids
        return lambda b, h, q, k: ids.to(q.device)[q] == ids.to(k.device)[k]

    def _kept_pairs(self, q_len, kv_len, block) -> int:
        self.mask_mod(q_len, kv_len)
        return int((self.cu_seqlens.diff() ** 2).sum())

    def _block_layout(self, q_len, kv_len, block_q, block_k, device):
        # document ids are non-decreasing, so a tile spans the id ranges of its first and last row / column
        self.mask_mod(q_len, kv_len)
        ids = self.doc_ids
        q0, q1 = block_bounds(q_len, block_q)
        k0, k1 = block_bounds(kv_len, block_k)
        dq0, dq1, dk0, dk1 = ids[q0][:, None], ids[q1][:, None], ids[k0][None, :], ids[k1][None, :]
        out = layout_from((dq0 <= dk1) & (dk0 <= dq1), (dq0 == dq1) & (dk0 == dk1) & (dq0 == dk0))
        return out.view(1, 1, *out.shape).to(device)

    def reach(self):
        return Reach(prefix_stable=False)  # offsets of one packed sequence

    def __repr__(self):
        return f"document({self.cu_seqlens.tolist()})"


class PrefixLM(MaskSpec):
    """The first ``n`` tokens attend bidirectionally among themselves; the rest are causal."""

    def __init__(self, n: int):
        self.n = check_positive_int("n", n, allow_zero=True)

    def mask_mod(self, q_len, kv_len):
        offset, n = kv_len - q_len, self.n
        return lambda b, h, q, k: (k < n) | ((q + offset) >= k)

    def __repr__(self):
        return f"prefix_lm({self.n})"


class AtPositions(MaskSpec):
    """``spec`` evaluated at token positions rather than at row / column indices: query row ``i`` sits at
    ``q_pos[b, i]`` and key column ``j`` at ``k_pos[b, j]`` of a sequence of ``length`` tokens, as
    ``spec.mask_mod(length, length)`` sees them. KV caches need it where columns stop being positions: a left-padded
    row, a ring buffer that dropped old keys, pinned keys in front of a window. Negative key positions (padding)
    keep nothing. The spec must be prefix-stable (:class:`Reach`), as it sees ``length`` positions, not the row's
    own count. Its dense forms are the generic ones: ``O(Tq * Tk)`` work per batch row the positions depend on."""

    def __init__(self, spec: MaskSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, length: int):
        self.spec = as_mask_spec(spec, "spec")
        for name, pos in (("q_pos", q_pos), ("k_pos", k_pos)):
            check_tensor(name, pos, ndim=2, floating=False)
        rows = {q_pos.shape[0], k_pos.shape[0]} - {1}
        if len(rows) > 1:
            raise ValueError(f"k_pos: expected batch size {q_pos.shape[0]} (that of q_pos) or 1, received "
                             f"{k_pos.shape[0]}")
        self.q_pos, self.k_pos = q_pos, k_pos
        self.length = check_positive_int("length", length, allow_zero=True)
        self.batch_size = _merge_dim("batch size", rows.pop() if rows else None, self.spec.batch_size)
        self.num_heads = self.spec.num_heads

    def mask_mod(self, q_len, kv_len):
        if self.q_pos.shape[1] != q_len or self.k_pos.shape[1] != kv_len:
            raise ValueError(f"q_pos/k_pos: expected {q_len} query and {kv_len} key positions, received "
                             f"{self.q_pos.shape[1]} and {self.k_pos.shape[1]}")
        inner, last = self.spec.mask_mod(self.length, self.length), max(self.length - 1, 0)
        q_pos, k_pos = self.q_pos, self.k_pos
        nq, nk = q_pos.shape[0], k_pos.shape[0]

        def mod(b, h, q, k):
            pq, pk = q_pos.to(q.device)[b % nq, q], k_pos.to(k.device)[b % nk, k]
            return inner(b, h, pq.clamp(0, last), pk.clamp(0, last)) & (pk >= 0)

        return mod

    def reach(self):
        return self.spec.reach()

    def __repr__(self):
        return f"at_positions({self.spec!r}, length={self.length})"


def causal() -> MaskSpec:
    return Causal()


def padding(lengths) -> MaskSpec:
    return Padding(lengths)


def document(cu_seqlens) -> MaskSpec:
    return Document(cu_seqlens)


def prefix_lm(n: int) -> MaskSpec:
    return PrefixLM(n)


def at_positions(spec, q_pos: torch.Tensor, k_pos: torch.Tensor, *, length: int) -> MaskSpec:
    """``spec`` at query positions ``q_pos`` ``[B|1, Tq]`` and key positions ``k_pos`` ``[B|1, Tk]`` of a
    ``length``-token sequence (:class:`AtPositions`)."""
    return AtPositions(spec, q_pos, k_pos, length)


def as_mask_spec(mask, name: str = "mask") -> MaskSpec:
    """Accept a spec or a boolean tensor; anything else is a TypeError naming ``name``."""
    if isinstance(mask, MaskSpec):
        return mask
    if isinstance(mask, torch.Tensor):
        return TensorMask(mask)
    raise TypeError(f"{name}: expected a MaskSpec from hybridattn.ops.masks or a bool tensor, received {type(mask).__name__}")

# Sparse specs live beside this file; re-exported so that `masks.sliding_window(...)` works.
from hybridattn.ops.sparse_masks import (  # noqa: E402,F401
    bigbird, block_sparse, dilated, fixed, global_tokens, longformer, sliding_window, strided,
)
