"""Block-sparse softmax attention whose cost scales with the pairs a mask keeps.

The mask spec's ``block_layout`` says which (query block, key block) tiles hold any kept pair. Query blocks that
need the same number of key blocks form a group; for each group the needed key / value blocks are gathered into
a short, dense key sequence per query block, and one batched SDPA call attends over it (with the spec's
``mask_mod`` evaluated on the gathered positions when a tile is only partly kept). Autograd flows through the
gathers and SDPA, so the backward pass also touches only the kept tiles, and every step is a torch op that runs
on any device.

Cost: ``sum over groups of G * M * block_q * block_k`` pairs, i.e. the kept pairs rounded up to whole tiles.
Memory: the gathered keys and values, ``M * block_k / block_q`` times the size of ``k`` and ``v``.

Shape legend: B batch, Tq / Tk query / key length, Hq / Hkv query / key-value heads, D head dim, Dv value head
dim, nQ / nK query / key blocks, G query blocks in a group, M key blocks each of them reads.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybridattn.ops._checks import check_positive_int, check_qkv
from hybridattn.ops.masks import EMPTY, FULL, Causal, Document, MaskSpec, Padding, _Combined, as_mask_spec
from hybridattn.ops.sparse_masks import BlockSparse, Fixed, GlobalTokens, _DistanceSpec

__all__ = ["BlockGroup", "BlockPlan", "block_sparse_attention", "cached_plan", "plan_blocks", "prefers_block_sparse"]

#: how many distinct group widths a plan may have before widths are rounded up (each group is one SDPA call)
MAX_GROUPS = 8


@dataclass
class BlockGroup:
    """Query blocks that read the same number ``M`` of key blocks: ``q_blocks [G]``, ``k_blocks [G, M]`` and the
    keep mask ``[B|1, G|1, H|1, bq, M * bk]`` over the gathered positions (None when every tile is FULL)."""

    q_blocks: torch.Tensor
    k_blocks: torch.Tensor
    keep: torch.Tensor | None
    rows_kept: bool  # False when some query row of the group has no kept key at all
    q_inv: torch.Tensor  # inverse indices of q_blocks / k_blocks for the gathers' backward (see inverse_index)
    k_inv: torch.Tensor

    def __post_init__(self):
        self._additive: dict = {}

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``keep`` as SDPA's additive mask (0 / -inf), made once per dtype: SDPA would otherwise convert the
        boolean mask on every call. Rows without any kept key attend freely here and are zeroed afterwards, so
        that SDPA never computes 0/0."""
        if dtype not in self._additive:
            keep = self.keep if self.rows_kept else self.keep | ~self.keep.any(-1, keepdim=True)
            zero = torch.zeros((), dtype=dtype, device=keep.device)
            self._additive[dtype] = torch.where(keep, zero, torch.full((), float("-inf"), dtype=dtype,
                                                                       device=keep.device))
        return self._additive[dtype]


@dataclass
class BlockPlan:
    """Which tiles to compute for one (spec, Tq, Tk, tiles, device); reusable across calls and heads.
    ``empty_q_blocks`` are query blocks without any kept pair (their output is zero)."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    groups: list[BlockGroup]
    empty_q_blocks: torch.Tensor
    order: torch.Tensor  # puts the concatenated group outputs (then the empty blocks) back in block order
    order_inv: torch.Tensor

    def computed_pairs(self) -> int:
        """Query-key pairs the kernel computes per batch row and head (kept pairs rounded up to tiles)."""
        return sum(g.k_blocks.numel() for g in self.groups) * self.block_q * self.block_k


class _GatherRows(torch.autograd.Function):
    """``src.index_select(1, idx)`` whose backward is a gather too: ``inv [N, R]`` lists, for each source row,
    the output rows that read it (``S`` = none). CPU ``index_add`` (the stock backward) is single-threaded and
    was the slowest step of the whole kernel; gather + sum runs at memory speed on any device."""

    @staticmethod
    def forward(ctx, src, idx, inv):
        ctx.save_for_backward(inv)
        return src.index_select(1, idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        n, r = inv.shape
        s = grad.shape[1]
        flat = inv.flatten()
        out = grad.index_select(1, flat.clamp(max=s - 1))  # (B, n * r, F...)
        empty = torch.nonzero(flat == s).flatten()
        if empty.numel():
            out.index_fill_(1, empty, 0)  # slots that read nothing; touching only them is cheaper than padding grad
        out = out.view(grad.shape[0], n, r, *grad.shape[2:])
        return (out.squeeze(2) if r == 1 else out.sum(2)), None, None


def inverse_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """For ``idx [S]`` with values in ``[0, n)``: ``inv [n, R]`` with the positions reading each value, padded
    with ``S`` (``R`` = the largest multiplicity, at least 1)."""
    s = idx.numel()
    counts = torch.bincount(idx, minlength=n)
    r = max(int(counts.max()) if s else 1, 1)
    pos = torch.argsort(idx, stable=True)
    sorted_idx = idx[pos]
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(s, device=idx.device) - first[sorted_idx]
    inv = torch.full((n, r), s, dtype=torch.long, device=idx.device)
    inv[sorted_idx, rank] = pos
    return inv


def gather_rows(src: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor | None = None) -> torch.Tensor:
    """``src [B, N, F...]`` rows ``idx`` along dim 1, differentiable with a gather-based backward."""
    if inv is None:
        inv = inverse_index(idx, src.shape[1])
    return _GatherRows.apply(src, idx, inv)


def _round_widths(widths: torch.Tensor) -> torch.Tensor:
    """Round group widths up to a few levels so a ragged layout (e.g. BigBird & causal) makes few SDPA calls."""
    levels = torch.unique(widths)
    if levels.numel() <= MAX_GROUPS:
        return widths
    # geometric levels between the smallest and the largest width, at most MAX_GROUPS of them
    lo, hi = float(levels[0]), float(levels[-1])
    grid = torch.unique(torch.ceil(torch.logspace(math.log10(lo), math.log10(hi), MAX_GROUPS)).long())
    grid[-1] = int(hi)
    return grid[torch.searchsorted(grid, widths.cpu())].to(widths.device)


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


def plan_blocks(spec: MaskSpec, q_len: int, kv_len: int, block_q: int, block_k: int, *, device=None) -> BlockPlan:
    """Group query blocks by the key blocks they need (union over batch rows and heads), with their masks."""
    layout = spec.block_layout(q_len, kv_len, block_q, block_k, device=device)  # [B|1, H|1, nQ, nK]
    need = (layout != EMPTY).flatten(0, 1).any(0)  # (nQ, nK)
    all_full = (layout == FULL).flatten(0, 1).all(0)
    if kv_len % block_k:
        all_full[:, -1] = False  # the cut-short last key block needs a mask for its missing keys
    counts = need.sum(-1)
    padded = torch.zeros_like(counts)
    padded[counts > 0] = _round_widths(counts[counts > 0])
    # needed key blocks first, in ascending order (a stable sort of "not needed")
    order = torch.argsort((~need).to(torch.int8), dim=-1, stable=True)
    mask_mod = spec.mask_mod(q_len, kv_len)
    groups = []
    for width in torch.unique(padded[counts > 0]).tolist():
        rows = torch.nonzero(padded == width).flatten()
        slot_ok = torch.arange(width, device=need.device)[None, :] < counts[rows, None]
        kb = torch.where(slot_ok, order[rows, :width], order[rows, :1])  # padded slots repeat a real block
        full = all_full[rows[:, None], kb] & slot_ok
        keep = None
        if not bool(full.all()):
            # padded slots are "not full" and get masked: their positions fail the slot_ok test below
            keep = _group_keep(spec, mask_mod, q_len, kv_len, rows, kb, full, block_q, block_k)
            keep = keep & slot_ok.repeat_interleave(block_k, dim=1)[None, :, None, None, :]
        rows_kept = keep is None or bool(keep.any(-1).all())
        if keep is not None and bool((keep == keep[:, :1]).all()):
            keep = keep[:, :1]  # translation-invariant patterns (windows) share one tile mask across the group
        n_q, n_k = need.shape
        groups.append(BlockGroup(rows, kb, keep, rows_kept, inverse_index(rows, n_q), inverse_index(kb.flatten(), n_k)))
    empty = torch.nonzero(counts == 0).flatten()
    order = torch.argsort(torch.cat([g.q_blocks for g in groups] + [empty]))
    return BlockPlan(q_len, kv_len, block_q, block_k, groups, empty, order, inverse_index(order, order.numel()))


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


def block_sparse_attention(q, k, v, mask=None, *, causal: bool = False, scale: float | None = None,
                           block_q: int = 64, block_k: int = 64, plan: BlockPlan | None = None):
    """Softmax attention over the pairs ``mask`` keeps, computing only the tiles its block layout needs.

    Args:
        q: queries ``[B, Tq, Hq, D]``.
        k: keys ``[B, Tk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA).
        v: values ``[B, Tk, Hkv, Dv]``.
        mask: a ``MaskSpec`` (e.g. ``masks.sliding_window(512)``, ``masks.bigbird(...)``, compositions) or a bool
            tensor broadcastable to ``[B, Hq, Tq, Tk]``; ``None`` keeps every pair.
        causal: AND the mask with the bottom-right aligned causal mask.
        scale: logit scale, default ``1 / sqrt(D)``.
        block_q, block_k: tile sizes; smaller tiles follow the mask more tightly, larger ones batch better.
        plan: a ``plan_blocks(...)`` / ``cached_plan(...)`` result for this spec, lengths and tiles; planning
            (block layout, group masks) costs about as much as a forward pass, so reuse it across calls.

    Returns:
        ``o`` ``[B, Tq, Hq, Dv]`` in q's dtype; rows without any kept key are zero (with zero gradients).

    Raises:
        TypeError / ValueError: invalid tensors, head counts, mask, or tile sizes (the message names the argument).
    """
    b, tq, hq, d, tk, hkv, dv = check_qkv(q, k, v)
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    spec = None if mask is None else as_mask_spec(mask, "mask")
    if causal:
        spec = Causal() if spec is None else Causal() & spec
    if spec is None:
        spec = _KeepAll()
    for name, size, ref in (("batch size", spec.batch_size, b), ("head count", spec.num_heads, hq)):
        if size not in (None, ref):
            raise ValueError(f"mask: expected a {name} of {ref} (that of q) or 1, received {size}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if tq == 0 or tk == 0:
        return q.new_zeros(b, tq, hq, dv) + 0 * (q.sum() + k.sum() + v.sum())
    if plan is None:
        plan = plan_blocks(spec, tq, tk, block_q, block_k, device=q.device)
    elif (plan.q_len, plan.kv_len, plan.block_q, plan.block_k) != (tq, tk, block_q, block_k):
        raise ValueError(f"plan: expected one made for Tq={tq}, Tk={tk}, tiles ({block_q}, {block_k}), received "
                         f"Tq={plan.q_len}, Tk={plan.kv_len}, tiles ({plan.block_q}, {plan.block_k})")
    bq, bkk = block_q, block_k
    n_q, n_k = -(-tq // bq), -(-tk // bkk)
    # Blocks are rows of one flat dimension so that gathers are index_select, whose backward is a fast
    # index_add (advanced indexing would backpropagate through a much slower accumulating index_put).
    qp = F.pad(q, (0, 0, 0, 0, 0, n_q * bq - tq)).view(b, n_q, bq * hq * d)
    kp = F.pad(k, (0, 0, 0, 0, 0, n_k * bkk - tk)).view(b, n_k, bkk * hkv * d)
    vp = F.pad(v, (0, 0, 0, 0, 0, n_k * bkk - tk)).view(b, n_k, bkk * hkv * dv)

    outs = []
    for grp in plan.groups:
        g, m = grp.k_blocks.shape
        flat_k = grp.k_blocks.flatten()
        qg = gather_rows(qp, grp.q_blocks, grp.q_inv).view(b * g, bq, hq, d).transpose(1, 2)  # (B*G, Hq, bq, D)
        kg = gather_rows(kp, flat_k, grp.k_inv).view(b * g, m * bkk, hkv, d).transpose(1, 2)  # (B*G, Hkv, M*bk, D)
        vg = gather_rows(vp, flat_k, grp.k_inv).view(b * g, m * bkk, hkv, dv).transpose(1, 2)
        attn_mask = None
        if grp.keep is not None:
            keep = grp.additive_mask(q.dtype)
            if keep.shape[:2] == (1, 1):
                attn_mask = keep[0]  # one tile mask for the whole group: SDPA broadcasts it, no copy
            else:
                attn_mask = keep.expand(b, g, *keep.shape[2:]).reshape(b * g, keep.shape[2], bq, m * bkk)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn_mask, scale=scale, enable_gqa=hq != hkv)
        if not grp.rows_kept:
            kept = grp.keep.any(-1, keepdim=True).expand(b, g, *grp.keep.shape[2:-1], 1)
            o = torch.where(kept.reshape(b * g, -1, bq, 1), o, torch.zeros((), dtype=o.dtype, device=o.device))
        outs.append(o.transpose(1, 2).reshape(b, g, bq * hq * dv))
    if plan.empty_q_blocks.numel():
        outs.append(q.new_zeros(b, plan.empty_q_blocks.numel(), bq * hq * dv))
    out = gather_rows(torch.cat(outs, dim=1), plan.order, plan.order_inv)  # (B, nQ, bq * Hq * Dv)
    return out.view(b, n_q * bq, hq, dv)[:, :tq]


class _KeepAll(MaskSpec):
    """Every pair kept (``mask=None``): one FULL tile grid, no mask evaluation."""

    def mask_mod(self, q_len, kv_len):
        return lambda b, h, q, k: (q >= 0) & (k >= 0)

    def block_layout(self, q_len, kv_len, block_q, block_k, *, device=None):
        shape = (1, 1, -(-q_len // block_q), -(-kv_len // block_k))
        return torch.full(shape, FULL, dtype=torch.int8, device=device)


#: specs whose block layout has a closed form, so that judging their density costs O(nblocks^2), not O(T^2)
_CLOSED_FORM = (Causal, Padding, Document, _DistanceSpec, Fixed, GlobalTokens, BlockSparse, _KeepAll)
#: ``auto`` prefers this kernel with tiles of AUTO_BLOCK when at most AUTO_MAX_DENSITY of the tiles are kept and
#: a query block reads at most AUTO_MAX_TILES key tiles on average (the gathered keys are that many times k)
AUTO_BLOCK, AUTO_MAX_DENSITY, AUTO_MAX_TILES = 128, 0.5, 16


def _closed(spec) -> bool:
    return isinstance(spec, _CLOSED_FORM) or (isinstance(spec, _Combined) and _closed(spec.left) and _closed(spec.right))


def _described_by_repr(spec) -> bool:
    """Closed-form specs whose repr names every parameter (an explicit block layout prints only its shape)."""
    if isinstance(spec, _Combined):
        return _described_by_repr(spec.left) and _described_by_repr(spec.right)
    return isinstance(spec, _CLOSED_FORM) and (type(spec) is not BlockSparse)


#: plans of specs identified by their repr: softmax_attention(causal=True) wraps the caller's spec in a new
#: object on every call, so the per-object cache would never hit for a layer's pattern
_PLANS_BY_REPR: dict = {}


def prefers_block_sparse(spec: MaskSpec | None, q_len: int, kv_len: int) -> bool:
    """Whether ``softmax_attention(backend="auto")`` should run this kernel: a spec built only from closed-form
    parts (windows, global tokens, Sparse Transformer, BigBird, block layouts, causal) that keeps at most half of
    its tiles, with a bounded number of key tiles per query block. Denser masks gain little from skipping tiles,
    and wide ones would pay for the gathers in memory; the tiled backend serves both."""
    if spec is None or type(spec) is Causal or not _closed(spec):
        return False
    kept = (spec.block_layout(q_len, kv_len, AUTO_BLOCK, AUTO_BLOCK) != EMPTY).flatten(0, 1).any(0)  # (nQ, nK)
    return float(kept.float().mean()) <= AUTO_MAX_DENSITY and float(kept.sum(-1).float().mean()) <= AUTO_MAX_TILES


def _backend(q, k, v, *, mask, bias, scale, softcap):
    """``softmax_attention(backend="block_sparse")``: masks only (no bias or softcap)."""
    if bias is not None or softcap is not None:
        raise ValueError("backend: 'block_sparse' takes a mask only; use backend='tiled' with a bias or softcap")
    t = max(q.shape[1], k.shape[1])
    block = AUTO_BLOCK if t >= 4 * AUTO_BLOCK else 32
    plan = None
    if mask is not None and _described_by_repr(mask):
        key = (repr(mask), q.shape[1], k.shape[1], block, str(q.device))
        if key not in _PLANS_BY_REPR:
            if len(_PLANS_BY_REPR) >= 8:
                _PLANS_BY_REPR.pop(next(iter(_PLANS_BY_REPR)))
            _PLANS_BY_REPR[key] = plan_blocks(mask, q.shape[1], k.shape[1], block, block, device=q.device)
        plan = _PLANS_BY_REPR[key]
    elif mask is not None:
        plan = cached_plan(mask, q.shape[1], k.shape[1], block, block, device=q.device)
    return block_sparse_attention(q, k, v, mask, scale=scale, block_q=block, block_k=block, plan=plan)


def _register_backend() -> None:
    from hybridattn.ops.softmax_attention import BACKENDS

    BACKENDS.setdefault("block_sparse", _backend)


_register_backend()
