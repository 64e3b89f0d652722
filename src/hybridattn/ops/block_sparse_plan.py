"""Tile plans for the block-sparse kernel (``block_sparse_attention.py``): which (query block, key block) tiles a
mask spec keeps, grouped so that the kernel reads each query block's keys as a few contiguous ranges.

A plan depends only on the spec, the lengths, the tile sizes and the device, so layers reuse it across calls
(:func:`cached_plan`).

Shape legend: Tq / Tk query / key length, nQ / nK query / key blocks, G query blocks in a group, M key blocks
each of them reads.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

import torch.nn.functional as F

from hybridattn.ops.masks import EMPTY, FULL, MaskSpec

__all__ = ["BlockGroup", "BlockPlan", "KeySegment", "NativeLayout", "QueryBlock", "cached_plan", "native_layout",
           "plan_blocks"]


@dataclass
class BlockGroup:
    """Query blocks of ``block_q`` rows that read the same number ``M`` of key blocks: ``q_blocks [G]`` (in units
    of ``block_q``), ``k_blocks [G, M]`` and the keep mask ``[B|1, G|1, H|1, block_q, M * bk]`` over the read
    positions (None when every tile is FULL)."""

    block_q: int
    q_blocks: torch.Tensor
    k_blocks: torch.Tensor
    keep: torch.Tensor | None
    rows_kept: bool  # False when some query row of the group has no kept key at all

    def __post_init__(self):
        self._masks: dict = {}

    def _cached(self, key, make) -> torch.Tensor:
        if key not in self._masks:
            self._masks[key] = make()
        return self._masks[key]

    def _attended(self) -> torch.Tensor:
        # rows without any kept key attend freely here and are zeroed afterwards (row_kept), so that the
        # softmax never computes 0/0
        return self.keep if self.rows_kept else self.keep | ~self.keep.any(-1, keepdim=True)

    def weight_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``keep`` as 1 / 0 factors on ``exp(logits)``, made once per dtype. Masking after exp() rather than
        adding -inf before it keeps exp() on its fast path (exp of -inf or of a huge negative number produces
        subnormals, which cost ~20x per element on x86)."""
        return self._cached(("weight", dtype), lambda: self._attended().to(dtype))

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``keep`` as 0 / -inf logits (for the row maximum over kept keys), made once per dtype."""
        return self._cached(("additive", dtype), lambda: torch.zeros((), dtype=dtype, device=self.keep.device)
                            .masked_fill(~self._attended(), float("-inf")))

    def row_kept(self, dtype: torch.dtype) -> torch.Tensor:
        """``[B|1, G|1, H|1, bq, 1]``: 1 for query rows with a kept key, 0 for the others (only when
        ``rows_kept`` is False)."""
        return self._cached(("rows", dtype), lambda: self.keep.any(-1, keepdim=True).to(dtype))


@dataclass
class KeySegment:
    """Keys one query block reads in one matmul: the tokens of a contiguous range (``keys`` a slice, read as a
    view of k) or the tokens listed in ``keys`` (gathered; positions past the end repeat the last key and are
    masked). They are columns ``[offset, offset + width)`` of the group's tile mask."""

    offset: int
    width: int
    keys: slice | torch.Tensor


@dataclass
class QueryBlock:
    """One step of the kernel's loop: query rows ``[start, start + rows)``, row ``index`` of group ``group``,
    attend to the keys of ``segments``."""

    start: int
    rows: int
    group: int
    index: int
    segments: list[KeySegment]


@dataclass
class BlockPlan:
    """Which tiles to compute for one (spec, Tq, Tk, tiles, device); reusable across calls and heads.
    ``empty_q_blocks`` are query blocks without any kept pair (never computed). Groups of wide query blocks
    (global tokens' rows) may use tiles of ``block_q // REFINE`` rows."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    groups: list[BlockGroup]
    empty_q_blocks: torch.Tensor
    blocks: list[QueryBlock]

    def computed_pairs(self) -> int:
        """Query-key pairs the kernel computes per batch row and head (kept pairs rounded up to tiles)."""
        return sum(g.k_blocks.numel() * g.block_q for g in self.groups) * self.block_k


def _group_keep(spec, mask_mod, q_len, kv_len, q_blocks, k_blocks, full, block_q, block_k):
    """Keep mask ``[B|1, G, H|1, bq, M * bk]``: FULL tiles are True without asking the spec; ``mask_mod`` is
    evaluated on the partial tiles only (``full`` ``[G, M]`` marks the tiles FULL for every batch row and head)."""
    device = q_blocks.device
    g, m = k_blocks.shape
    nb, nh = spec.batch_size or 1, spec.num_heads or 1
    keep = full[None, :, None, None, :, None].expand(nb, g, nh, block_q, m, block_k).clone()
    gi, mi = torch.nonzero(~full, as_tuple=True)
    if gi.numel():
        q_pos = (q_blocks[gi, None] * block_q + torch.arange(block_q, device=device)).clamp(max=q_len - 1)
        k_pos = k_blocks[gi, mi, None] * block_k + torch.arange(block_k, device=device)  # (P, bk)
        b = torch.arange(nb, device=device).view(1, -1, 1, 1, 1)
        h = torch.arange(nh, device=device).view(1, 1, -1, 1, 1)
        tile = mask_mod(b, h, q_pos[:, None, None, :, None], k_pos.clamp(max=kv_len - 1)[:, None, None, None, :])
        tile = tile.to(torch.bool) & (k_pos < kv_len)[:, None, None, None, :]
        keep[:, gi, :, :, mi, :] = tile.expand(-1, nb, nh, -1, -1)  # advanced indices first: (P, B, H, bq, bk)
    return keep.flatten(-2)


#: a query block's key blocks are read as at most this many contiguous ranges (views of k, no copy); beyond
#: that, ranges shorter than LONG_RUN keys are gathered into one segment (e.g. BigBird's random blocks)
MAX_SEGMENTS, LONG_RUN = 2, 256


def _runs(blocks: list[int]) -> list[list[int]]:
    """Ascending block indices split into runs of consecutive ones."""
    runs = [[blocks[0]]]
    for blk in blocks[1:]:
        if blk == runs[-1][-1] + 1:
            runs[-1].append(blk)
        else:
            runs.append([blk])
    return runs


def _segment_order(blocks: list[int], block_k: int) -> list[list[int]]:
    """The key blocks of one query block as segments: each run a range if there are few runs, else the long runs
    as ranges and every other block in one gathered segment (last)."""
    runs = _runs(blocks)
    if len(runs) <= MAX_SEGMENTS:
        return runs
    long = [r for r in runs if len(r) * block_k >= LONG_RUN]
    rest = [blk for r in runs if len(r) * block_k < LONG_RUN for blk in r]
    return long + [rest]


def _query_blocks(q_blocks, segmented, q_len, kv_len, block_q, block_k, group, device) -> list[QueryBlock]:
    """The loop steps of one group: ``segmented`` holds each row's key blocks split into segments (in the order
    of the group's mask columns)."""
    steps = []
    for i, (qb, segs) in enumerate(zip(q_blocks, segmented)):
        segments, offset = [], 0
        for seg in segs:
            if seg == list(range(seg[0], seg[0] + len(seg))):
                keys = slice(seg[0] * block_k, min((seg[0] + len(seg)) * block_k, kv_len))
                width = keys.stop - keys.start
            else:
                tokens = torch.tensor(seg, device=device)[:, None] * block_k + torch.arange(block_k, device=device)
                keys, width = tokens.flatten().clamp(max=kv_len - 1), len(seg) * block_k
            segments.append(KeySegment(offset, width, keys))
            offset += len(seg) * block_k
        steps.append(QueryBlock(qb * block_q, min(block_q, q_len - qb * block_q), group, i, segments))
    return steps


def _needed_tiles(spec, q_len, kv_len, block_q, block_k, device):
    """``(need, full)`` ``[nQ, nK]``: tiles with a kept pair for some batch row / head, and tiles fully kept for
    all of them."""
    layout = spec.block_layout(q_len, kv_len, block_q, block_k, device=device)  # [B|1, H|1, nQ, nK]
    need = (layout != EMPTY).flatten(0, 1).any(0)
    full = (layout == FULL).flatten(0, 1).all(0)
    if kv_len % block_k:
        full[:, -1] = False  # the cut-short last key block needs a mask for its missing keys
    return need, full


def _groups(spec, q_len, kv_len, block_q, block_k, need, all_full, q_rows, first_group: int):
    """Groups (and loop steps) for the query blocks ``q_rows`` of a ``need`` / ``all_full`` tile grid: one group
    per number of key blocks read."""
    counts = need.sum(-1)
    # needed key blocks first, in ascending order (a stable sort of "not needed")
    order = torch.argsort((~need).to(torch.int8), dim=-1, stable=True)
    mask_mod = spec.mask_mod(q_len, kv_len)
    groups, blocks = [], []
    for width in torch.unique(counts[q_rows]).tolist():
        rows = q_rows[counts[q_rows] == width]
        segmented = [_segment_order(r, block_k) for r in order[rows, :width].tolist()]
        kb = torch.tensor([[blk for seg in segs for blk in seg] for segs in segmented], device=need.device)
        full = all_full[rows[:, None], kb]
        keep = None
        if not bool(full.all()):
            keep = _group_keep(spec, mask_mod, q_len, kv_len, rows, kb, full, block_q, block_k)
        rows_kept = keep is None or bool(keep.any(-1).all())
        if keep is not None and bool((keep == keep[:, :1]).all()):
            keep = keep[:, :1]  # translation-invariant patterns (windows) share one tile mask across the group
        groups.append(BlockGroup(block_q, rows, kb, keep, rows_kept))
        blocks += _query_blocks(rows.tolist(), segmented, q_len, kv_len, block_q, block_k,
                                first_group + len(groups) - 1, need.device)
    return groups, blocks


#: query blocks reading more than WIDE x the median number of key blocks (the rows of global tokens) are
#: planned again with tiles of block_q // REFINE rows, when that computes at most half as many pairs for them
WIDE, REFINE = 4, 4


def plan_blocks(spec: MaskSpec, q_len: int, kv_len: int, block_q: int, block_k: int, *, device=None) -> BlockPlan:
    """Group query blocks by the key blocks they need (union over batch rows and heads), with their masks."""
    need, all_full = _needed_tiles(spec, q_len, kv_len, block_q, block_k, device)
    counts = need.sum(-1)
    wide = counts > WIDE * counts[counts > 0].float().median() if bool((counts > 0).any()) else counts > 0
    fine_q = block_q // REFINE
    refine = torch.zeros_like(wide)
    if bool(wide.any()) and fine_q > 0 and block_q % REFINE == 0:
        fine_need, fine_full = _needed_tiles(spec, q_len, kv_len, fine_q, block_k, device)
        fine_counts = F.pad(fine_need.sum(-1), (0, REFINE * len(counts) - len(fine_need))).view(-1, REFINE)
        refine = wide & (2 * fine_counts.sum(1) <= REFINE * counts)  # pairs computed with fine tiles, halved
    groups, blocks = _groups(spec, q_len, kv_len, block_q, block_k, need, all_full,
                             torch.nonzero((counts > 0) & ~refine).flatten(), 0)
    if bool(refine.any()):
        fine_rows = torch.nonzero(refine.repeat_interleave(REFINE)[:len(fine_need)]).flatten()
        fine_rows = fine_rows[fine_need[fine_rows].any(-1)]
        more, more_blocks = _groups(spec, q_len, kv_len, fine_q, block_k, fine_need, fine_full, fine_rows,
                                    len(groups))
        groups, blocks = groups + more, blocks + more_blocks
    empty = torch.nonzero(counts == 0).flatten()
    return BlockPlan(q_len, kv_len, block_q, block_k, groups, empty, sorted(blocks, key=lambda blk: blk.start))


_PLANS: "weakref.WeakKeyDictionary[MaskSpec, dict]" = weakref.WeakKeyDictionary()


def cached_plan(spec: MaskSpec, q_len: int, kv_len: int, block_q: int, block_k: int, *, device=None) -> BlockPlan:
    """``plan_blocks`` remembered per spec object (a few lengths each), for layers that call the kernel with the
    same spec every step. Do not mutate a spec's tensors in place after planning with it."""
    per_spec = _PLANS.setdefault(spec, {})
    key = (q_len, kv_len, block_q, block_k, str(device))
    if key not in per_spec:
        if len(per_spec) >= 4:
            per_spec.pop(next(iter(per_spec)))
        per_spec[key] = plan_blocks(spec, q_len, kv_len, block_q, block_k, device=device)
    return per_spec[key]


#: the compiled kernel masks columns only where some row of the block drops them, judged per aligned run of this
#: many columns: finer would split a block's keys into many short pieces, coarser would mask more columns
MASK_GRAIN = 16


@dataclass
class NativeLayout:
    """A plan flattened for the compiled kernel (``csrc/block_sparse.cpp``, which documents the fields):
    ``items [N, 6]`` int64 per query block of ``plan.blocks``, ``pieces [P, 3]`` int64 contiguous key ranges,
    ``covers_all`` whether the items cover every query row (else the output must start zeroed)."""

    items: torch.Tensor
    pieces: torch.Tensor
    covers_all: bool
    groups: list[BlockGroup]

    def masks(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Each group's keep mask as 0 / 1 in ``dtype``, column-major ``[B|1, G|1, H|1, X, bq]`` (the kernel reads
        a key's flags over the rows as one vector); empty where every tile is FULL. Made once per dtype."""
        empty = torch.empty(0, dtype=dtype)
        return [empty if grp.keep is None else
                grp._cached(("native", dtype), lambda grp=grp: grp.keep.to("cpu", dtype).mT.contiguous())
                for grp in self.groups]


def _pieces(tokens: torch.Tensor, cols: torch.Tensor, col_full: torch.Tensor | None) -> list[list[int]]:
    """``[key, width, mask_col]`` rows for one segment read at ``tokens`` (mask columns ``cols``): split where the
    tokens stop being consecutive or the fully-kept flag changes; ``mask_col`` is -1 where no row drops a key."""
    fresh = torch.ones_like(tokens, dtype=torch.bool)
    fresh[1:] = tokens[1:] != tokens[:-1]  # a gathered last block repeats the last key past the end (masked)
    tokens, cols = tokens[fresh], cols[fresh]
    n = len(tokens)
    if col_full is None:
        full = torch.ones(n, dtype=torch.bool)
    else:
        pad = -n % MASK_GRAIN
        full = F.pad(col_full[cols], (0, pad), value=True).view(-1, MASK_GRAIN).all(1)
        full = full.repeat_interleave(MASK_GRAIN)[:n]
    start = torch.ones(n, dtype=torch.bool)
    start[1:] = (tokens[1:] != tokens[:-1] + 1) | (full[1:] != full[:-1])
    first = torch.nonzero(start).flatten().tolist() + [n]
    return [[int(tokens[a]), b - a, -1 if bool(full[a]) else int(cols[a])] for a, b in zip(first[:-1], first[1:])]


def native_layout(plan: BlockPlan) -> NativeLayout:
    """The plan's ``NativeLayout``, made once per plan."""
    layout = getattr(plan, "_native", None)
    if layout is not None:
        return layout
    items, pieces, covered = [], [], 0
    for blk in plan.blocks:
        keep = plan.groups[blk.group].keep
        col_full = None
        if keep is not None:
            col_full = keep[:, blk.index if keep.shape[1] > 1 else 0, :, :blk.rows].flatten(0, 2).all(0).cpu()
        first = len(pieces)
        for seg in blk.segments:
            if isinstance(seg.keys, slice):
                tokens = torch.arange(seg.keys.start, seg.keys.stop)
            else:
                tokens = seg.keys.cpu()
            pieces += _pieces(tokens, seg.offset + torch.arange(len(tokens)), col_full)
        items.append([blk.start, blk.rows, first, len(pieces), blk.group, blk.index])
        covered += blk.rows
    layout = NativeLayout(torch.tensor(items, dtype=torch.int64).view(-1, 6),
                          torch.tensor(pieces, dtype=torch.int64).view(-1, 3), covered == plan.q_len, plan.groups)
    plan._native = layout
    return layout
