"""Block-sparse softmax attention whose cost scales with the pairs a mask keeps.

The mask spec's ``block_layout`` says which (query block, key block) tiles hold any kept pair. Query blocks that
need the same number of key blocks form a group with one tile mask (shared by the whole group when the pattern
is translation invariant, as windows are). The kernel walks the query blocks one at a time; a block's keys are
read as a few contiguous ranges of ``k`` / ``v`` (views, no copy) or, for scattered blocks (BigBird's random
ones), gathered once into a reused buffer. Per query block, with plain matmuls:

    E = exp(scale * q k^T - m) * keep,   l = rowsum(E),   o = E v / l

where the shift ``m`` is 0 when ``|scale| |q_i| |k_j|`` bounds every logit of the block by ``EXP_SAFE`` (no
overflow or subnormal is possible, and the row maximum would cost two more passes over the tile), else the row
maximum over kept keys. The mask multiplies after exp() instead of adding -inf before it: exp() of -inf or of
large negative numbers produces subnormals, which cost ~20x per element on x86. The backward pass recomputes
``E`` block by block from ``q, k, v`` and the saved ``m, l`` (as flash attention does), so memory is the inputs,
the output and the gradients plus one block's tiles.

Cost: the kept pairs rounded up to whole tiles (``BlockPlan.computed_pairs``). Every step is a torch op that runs
on any device. On a CPU, float32 / float64 run compiled instead (``ops/csrc``, same arithmetic): the forward in
``block_sparse.cpp``, the backward in ``block_sparse_backward.cpp`` (one task per batch row and key head, so that
no two threads add to the same dk / dv rows); the loop below stays the reference they are tested against.

Shape legend: B batch, Tq / Tk query / key length, Hq / Hkv query / key-value heads, D head dim, Dv value head
dim, nQ / nK query / key blocks, G query blocks in a group (or query heads per key head, by context), M key
blocks each of them reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hybridattn.ops import _native
from hybridattn.ops._checks import check_choice, check_positive_int, check_qkv, check_scale
from hybridattn.ops.block_sparse_plan import (
    BlockGroup, BlockPlan, KeySegment, QueryBlock, cached_plan, native_layout, plan_blocks,
)
from hybridattn.ops.masks import EMPTY, FULL, Causal, Document, MaskSpec, Padding, _Combined, as_mask_spec
from hybridattn.ops.softmax_attention import accumulation_dtype
from hybridattn.ops.sparse_masks import BlockSparse, Fixed, GlobalTokens, _DistanceSpec

__all__ = ["BlockGroup", "BlockPlan", "KeySegment", "QueryBlock", "block_sparse_attention", "cached_plan", "plan_blocks",
           "prefers_block_sparse"]


#: logits bounded by this (|scale| * |q_i| * |k_j|, Cauchy-Schwarz) need no max shift before exp(): exp(+-40) and
#: sums of up to 1e20 such terms stay normal fp32 numbers, and the shift costs two passes over every tile
EXP_SAFE = 40.0


# ---------------------------------------------------------------------------------------------------------
# The kernel: one query block at a time, plain matmuls, recomputing backward
# ---------------------------------------------------------------------------------------------------------
class _Scratch:
    """Buffers reused by every query block of one call: a fresh allocation per block costs more than the
    arithmetic on it (cold cache lines, page faults), and block tiles stay in the caches when reused."""

    def __init__(self, dtype: torch.dtype, device):
        self.dtype, self.device, self.buffers, self.views = dtype, device, {}, {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        view = self.views.get((name, shape))
        if view is None:
            n, buf = math.prod(shape), self.buffers.get(name)
            if buf is None or buf.numel() < n:
                buf = self.buffers[name] = torch.empty(n, dtype=self.dtype, device=self.device)
                self.views = {key: old for key, old in self.views.items() if key[0] != name}
            view = self.views[(name, shape)] = buf[:n].view(shape)
        return view


# The loop runs one batch row at a time on [T, H, X] slices of the inputs: a key range is then a view
# (Hkv, width, X) whose rows are Hkv * X apart, which matmul reads as it is (no copy of k or v by head). Query
# rows are (t, g) ordered: the G query heads sharing a key / value head are extra rows of one matmul (GQA).
def _head_rows(x: torch.Tensor, blk: QueryBlock, hkv: int) -> torch.Tensor:
    """Rows of ``blk`` from ``x [T, Hq, X]`` as a view ``(Hkv, rows, G, X)``."""
    return x[blk.start:blk.start + blk.rows].unflatten(1, (hkv, -1)).transpose(0, 1)


def _matrix(x: torch.Tensor, blk: QueryBlock, hkv: int, scratch: "_Scratch", name: str) -> torch.Tensor:
    """Rows of ``blk`` from ``x [T, Hq, X]`` as ``(Hkv, rows * G, X)``: a view without GQA, else a copy."""
    if hkv == x.shape[1]:
        return x[blk.start:blk.start + blk.rows].transpose(0, 1)
    rows = _head_rows(x, blk, hkv)
    return scratch(name, *rows.shape).copy_(rows).flatten(1, 2)


def _keys(x: torch.Tensor, seg: KeySegment, scratch: _Scratch, name: str) -> torch.Tensor:
    """The keys (or values) of ``seg`` from ``x [Tk, Hkv, X]`` as ``(Hkv, width, X)``: a view for a range, else
    gathered into a scratch buffer."""
    if isinstance(seg.keys, slice):
        return x[seg.keys].transpose(0, 1)
    out = scratch(name, seg.width, x.shape[1], x.shape[2])
    return torch.index_select(x, 0, seg.keys, out=out).transpose(0, 1)


def _add_keys(dest: torch.Tensor, seg: KeySegment, src: torch.Tensor) -> None:
    """``dest [Tk, Hkv, X]`` at the keys of ``seg`` += ``src (Hkv, width, X)``."""
    if isinstance(seg.keys, slice):
        dest[seg.keys].add_(src.transpose(0, 1))
    else:
        dest.index_add_(0, seg.keys, src.transpose(0, 1))  # repeated padding keys add exact zeros (weights 0)


def _per_row(grp: BlockGroup, kind: str, dtype, blk: QueryBlock, batch: int, hkv: int, cols: slice):
    """A group mask (``kind``: see ``BlockGroup``) for ``blk`` of batch row ``batch`` (columns ``cols``), shaped
    to broadcast against a block's ``(Hkv, rows, G, X)`` view; the views are cached on the group."""
    t = getattr(grp, kind)(dtype)  # [B|1, G|1, H|1, bq, X]
    key = (kind, dtype, batch if t.shape[0] > 1 else 0, blk.index if t.shape[1] > 1 else 0, blk.rows, hkv,
           cols.start, cols.stop)
    view = grp._masks.get(key)
    if view is None:
        view = t[key[2], key[3], :, :blk.rows, cols]  # (H|1, rows, X)
        view = grp._masks[key] = view.unsqueeze(2) if view.shape[0] == 1 else view.unflatten(0, (hkv, -1)).transpose(1, 2)
    return view


def _weights(qv, k, grp: BlockGroup, blk: QueryBlock, batch: int, scale: float, shift, scratch: _Scratch):
    """Per key segment of ``blk``: ``(E, keys)`` with ``E = exp(scale * qv keys^T - shift)`` times the tile mask,
    ``(Hkv, rows * G, width)``. ``shift`` is the row maximum over kept keys, ``None`` to compute it (returned
    second), or ``False`` for no shift."""
    hkv = k.shape[1]
    out = []
    for j, seg in enumerate(blk.segments):
        kk = _keys(k, seg, scratch, f"k{j}")
        s = scratch(f"s{j}", hkv, qv.shape[1], seg.width)
        out.append((torch.baddbmm(s, qv, kk.transpose(1, 2), beta=0, alpha=scale, out=s), kk))
    cols = [slice(seg.offset, seg.offset + seg.width) for seg in blk.segments]
    if shift is None:
        maxima = [s.amax(-1, keepdim=True) if grp.keep is None else
                  (s.view(hkv, blk.rows, -1, s.shape[-1]) + _per_row(grp, "additive_mask", s.dtype, blk, batch, hkv, c))
                  .view_as(s).amax(-1, keepdim=True) for (s, _), c in zip(out, cols)]
        shift = torch.stack(maxima).amax(0)
    for (s, _), c in zip(out, cols):
        if shift is not False:
            # no subnormals or overflow: kept keys weigh at least e^-40 (< 1e-17 of the row's largest), masked
            # ones (perhaps above the maximum over kept keys) are zeroed below; the upper bound EXP_SAFE rather
            # than 0 keeps exact the rows that the compiled forward left unshifted (m = 0, |s| <= EXP_SAFE)
            s.sub_(shift).clamp_(min=-EXP_SAFE, max=EXP_SAFE)
        s.exp_()
        if grp.keep is not None:
            s.view(hkv, blk.rows, -1, s.shape[-1]).mul_(_per_row(grp, "weight_mask", s.dtype, blk, batch, hkv, c))
    return out, shift


def _zero_row_outputs(x: torch.Tensor, grp: BlockGroup, blk: QueryBlock, batch: int) -> None:
    """Zero the rows of ``x (Hkv, rows * G, X)`` that keep no key (they attended freely)."""
    if not grp.rows_kept:
        view = x.view(x.shape[0], blk.rows, -1, x.shape[-1])
        view.mul_(_per_row(grp, "row_kept", x.dtype, blk, batch, x.shape[0], slice(None)))


def _shift_needed(q, k, plan: BlockPlan, scale: float) -> list[bool]:
    """Per query block of ``plan.blocks``: whether its logits may leave ``[-EXP_SAFE, EXP_SAFE]``, so that exp()
    needs the row-max shift (bound: ``|scale| * max |q_i| * max |k_j|`` over the block's rows and keys)."""
    acc = accumulation_dtype(q.dtype)
    qn = torch.linalg.vector_norm(q.detach(), dim=-1, dtype=acc).amax(dim=(0, 2)) * abs(scale)  # (Tq,)
    kn = torch.linalg.vector_norm(k.detach(), dim=-1, dtype=acc).amax(dim=(0, 2))  # (Tk,)
    nk = -(-plan.kv_len // plan.block_k)
    k_max = F.pad(kn, (0, nk * plan.block_k - plan.kv_len)).view(nk, plan.block_k).amax(1)
    safe = []
    for grp in plan.groups:
        nq = -(-plan.q_len // grp.block_q)
        q_max = F.pad(qn, (0, nq * grp.block_q - plan.q_len)).view(nq, grp.block_q).amax(1)
        safe.append((q_max[grp.q_blocks] * k_max[grp.k_blocks].amax(1) <= EXP_SAFE).tolist())
    return [not safe[blk.group][blk.index] for blk in plan.blocks]


class _BlockSparseSoftmax(torch.autograd.Function):
    """Forward: per query block ``E = exp(s - m)``, ``l = rowsum(E)``, ``o = E v / l`` (saved: q, k, v, m).
    Backward recomputes ``E`` and ``l`` per block; with ``do' = do / l`` and ``delta = rowsum(E * do' v^T) / l``
    (``= rowsum(do' * o)``): ``dv = E^T do'``, ``ds = E * (do' v^T - delta)``, ``dq = scale * ds k``,
    ``dk = scale * ds^T q``.

    Why ``l`` and ``delta`` come from the backward's own ``E`` rather than the forward's ``l`` and ``o``: the
    compiled forward rounds ``s`` differently (other GEMM kernels), and exp() turns an ulp of a logit of 30 into
    a relative 2e-6 of a weight; gradients built from a mix of the two roundings were off by 3e-5 where each
    consistent set is within 1e-5."""

    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan, scale: float):
        b, tq, hq, _ = q.shape
        hkv, dv = k.shape[2], v.shape[3]
        g = hq // hkv
        acc = accumulation_dtype(q.dtype)
        native = _native_forward(q, k, v, plan, scale)
        if native is not None:
            out, shift, _, shifted = native
            ctx.save_for_backward(q, k, v, shift)
            ctx.plan, ctx.scale, ctx.shifted = plan, scale, shifted
            return out
        shifted = _shift_needed(q, k, plan, scale)
        out = q.new_zeros(b, tq, hq, dv)  # rows without any kept key stay zero
        shift = torch.zeros(b, hkv, tq * g, 1, dtype=acc, device=q.device)  # row shift m, (t, g) row order
        norm = torch.ones(b, hkv, tq * g, 1, dtype=acc, device=q.device)  # row sum l
        scratch = _Scratch(acc, q.device)
        for i in range(b):
            qi, ki, vi = q[i].to(acc), k[i].to(acc), v[i].to(acc)
            for blk, exact in zip(plan.blocks, shifted):
                grp, rows, n = plan.groups[blk.group], slice(blk.start * g, (blk.start + blk.rows) * g), blk.rows * g
                weights, m = _weights(_matrix(qi, blk, hkv, scratch, "q"), ki, grp, blk, i, scale,
                                      None if exact else False, scratch)
                if exact:
                    shift[i, :, rows] = m
                o, l = scratch("o", hkv, n, dv), norm[i, :, rows]
                for j, ((e, _), seg) in enumerate(zip(weights, blk.segments)):
                    vv = _keys(vi, seg, scratch, f"v{j}")
                    if j == 0:
                        torch.sum(e, -1, keepdim=True, out=l)
                        torch.bmm(e, vv, out=o)
                    else:
                        l += e.sum(-1, keepdim=True)
                        o.baddbmm_(e, vv)
                _zero_row_outputs(o, grp, blk, i)
                dest = _head_rows(out[i], blk, hkv)
                torch.div(o.view(dest.shape), l.view(hkv, blk.rows, g, 1), out=dest)
        ctx.save_for_backward(q, k, v, shift)
        ctx.plan, ctx.scale, ctx.shifted = plan, scale, shifted
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, shift = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        native = _native_backward(q, k, v, grad_out, shift, plan, scale, ctx.shifted)
        if native is not None:
            return (*native, None, None)
        b, _, hq, d = q.shape
        hkv, dv = k.shape[2], v.shape[3]
        g = hq // hkv
        acc = accumulation_dtype(q.dtype)
        dq = torch.zeros_like(q)
        dk, dvv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        scratch = _Scratch(acc, q.device)
        for i in range(b):
            qi, ki, vi, doi = q[i].to(acc), k[i].to(acc), v[i].to(acc), grad_out[i].to(acc)
            for blk, exact in zip(plan.blocks, ctx.shifted):
                grp, rows, n = plan.groups[blk.group], slice(blk.start * g, (blk.start + blk.rows) * g), blk.rows * g
                qv = _matrix(qi, blk, hkv, scratch, "q")
                weights, _ = _weights(qv, ki, grp, blk, i, scale, shift[i, :, rows] if exact else False, scratch)
                norm = scratch("l", hkv, n, 1)
                for j, (e, _) in enumerate(weights):
                    torch.sum(e, -1, keepdim=True, out=norm) if j == 0 else norm.add_(e.sum(-1, keepdim=True))
                do = scratch("do", hkv, blk.rows, g, dv)
                torch.div(_head_rows(doi, blk, hkv), norm.view(hkv, blk.rows, g, 1), out=do)
                do = do.view(hkv, n, dv)  # do' = do / l
                _zero_row_outputs(do, grp, blk, i)
                dps = [torch.bmm(do, _keys(vi, seg, scratch, f"v{j}").transpose(1, 2),
                                 out=scratch(f"ds{j}", hkv, n, seg.width)) for j, seg in enumerate(blk.segments)]
                delta = scratch("delta", hkv, n, 1)
                for j, ((e, _), dp) in enumerate(zip(weights, dps)):
                    ed = torch.mul(e, dp, out=scratch("ed", *e.shape)).sum(-1, keepdim=True)
                    delta.copy_(ed) if j == 0 else delta.add_(ed)
                delta.div_(norm)
                dqs = scratch("dq", hkv, n, d)
                for j, ((e, kk), seg, ds) in enumerate(zip(weights, blk.segments, dps)):
                    _add_keys(dvv[i], seg, torch.bmm(e.transpose(1, 2), do, out=scratch("dkv", hkv, seg.width, dv)))
                    ds.sub_(delta).mul_(e)
                    if j == 0:
                        torch.bmm(ds, kk, out=dqs)
                    else:
                        dqs.baddbmm_(ds, kk)
                    dks = scratch("dkv", hkv, seg.width, d)
                    _add_keys(dk[i], seg, torch.baddbmm(dks, ds.transpose(1, 2), qv, beta=0, alpha=scale, out=dks))
                dest = _head_rows(dq[i], blk, hkv)
                torch.mul(dqs.view(dest.shape), scale, out=dest)
        return dq, dk.to(k.dtype), dvv.to(v.dtype), None, None


def _native_forward(q, k, v, plan: BlockPlan, scale: float):
    """The forward by the compiled CPU kernel (``csrc/block_sparse.cpp``): ``(out, shift, norm, shifted)`` as the
    PyTorch loop saves them, or None where the kernel cannot run (not built, not CPU, not float32/float64).

    The kernel decides the row-max shift from its own norms (no pass over q and k here), per query head and 64
    rows for float32 with AVX-512, else per key head and block; ``shifted[i]`` says whether any rows of block i
    did, and its other rows keep ``m = 0``, which the backward's clamp to ``[-EXP_SAFE, EXP_SAFE]`` leaves exact
    (their logits are bounded by EXP_SAFE)."""
    ops = _native.native_ops("block_sparse") if _native.usable(q, k, v) else None
    if ops is None:
        return None
    layout = native_layout(plan)
    q, k, v = (x.contiguous() for x in (q, k, v))
    b, tq, hq, _ = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    rows = tq * (hq // hkv)
    out = q.new_empty(b, tq, hq, dv) if layout.covers_all else q.new_zeros(b, tq, hq, dv)
    shift, norm = q.new_zeros(b, hkv, rows, 1), q.new_ones(b, hkv, rows, 1)
    shifted = torch.zeros(len(plan.blocks), dtype=torch.uint8)
    ops.block_sparse_fwd(q, k, v, layout.items, layout.pieces, layout.masks(q.dtype), shifted, scale, out, shift,
                         norm)
    return out, shift, norm, [bool(x) for x in shifted.tolist()]


def _native_backward(q, k, v, grad_out, shift, plan: BlockPlan, scale: float, shifted: list[bool]):
    """``(dq, dk, dv)`` by the compiled CPU backward (``csrc/block_sparse_backward.cpp``, the same arithmetic as
    the loop in ``_BlockSparseSoftmax.backward``), or None where it cannot run (not built, not CPU, not
    float32/float64)."""
    ops = _native.native_ops("block_sparse_backward") if _native.usable(q, k, v, grad_out, shift) else None
    if ops is None:
        return None
    layout = native_layout(plan)
    q, k, v, shift = (x.contiguous() for x in (q, k, v, shift))  # grad_out is read with its strides
    dq, dk, dv = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)  # rows no block covers: dq = 0
    flags = torch.tensor(shifted, dtype=torch.uint8)
    ops.block_sparse_bwd(q, k, v, grad_out, layout.items, layout.pieces, layout.masks(q.dtype), flags, shift, scale,
                         dq, dk, dv)
    return dq, dk, dv


def compiled_workspace_bytes() -> int:
    """Bytes the compiled CPU forward keeps between calls: k and v made head-major (plus one norm per key row),
    reused so that each call does not fault in fresh pages; at most 512 MiB is kept, larger calls free theirs.
    torch's memory profiler does not see this buffer, so memory benchmarks add it. 0 when the kernel is not built."""
    ops = _native.built("block_sparse")
    return int(ops.block_sparse_workspace_bytes()) if ops is not None else 0


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
    scale = check_scale(scale, d)
    if tq == 0 or tk == 0:
        return q.new_zeros(b, tq, hq, dv) + 0 * (q.sum() + k.sum() + v.sum())
    if plan is None:
        plan = plan_blocks(spec, tq, tk, block_q, block_k, device=q.device)
    elif (plan.q_len, plan.kv_len, plan.block_q, plan.block_k) != (tq, tk, block_q, block_k):
        raise ValueError(f"plan: expected one made for Tq={tq}, Tk={tk}, tiles ({block_q}, {block_k}), received "
                         f"Tq={plan.q_len}, Tk={plan.kv_len}, tiles ({plan.block_q}, {plan.block_k})")
    return _BlockSparseSoftmax.apply(q, k, v, plan, scale)


class _KeepAll(MaskSpec):
    """Every pair kept (``mask=None``): one FULL tile grid, no mask evaluation."""

    def mask_mod(self, q_len, kv_len):
        return lambda b, h, q, k: (q >= 0) & (k >= 0)

    def block_layout(self, q_len, kv_len, block_q, block_k, *, device=None):
        shape = (1, 1, -(-q_len // block_q), -(-kv_len // block_k))
        return torch.full(shape, FULL, dtype=torch.int8, device=device)


#: specs whose block layout has a closed form, so that judging their density costs O(nblocks^2), not O(T^2)
_CLOSED_FORM = (Causal, Padding, Document, _DistanceSpec, Fixed, GlobalTokens, BlockSparse, _KeepAll)
#: ``auto`` prefers this kernel to the tiled backend (above DENSE_LIMIT) when, judged on tiles of AUTO_BLOCK, at
#: most AUTO_MAX_DENSITY of the tiles are kept and a query block reads at most AUTO_MAX_TILES key tiles on average
#: (wider masks go to the tiled backend)
AUTO_BLOCK, AUTO_MAX_DENSITY, AUTO_MAX_TILES = 128, 0.5, 16
#: below DENSE_LIMIT SDPA with a dense mask competes instead; ``auto`` runs this kernel there from this length on,
#: when at most AUTO_MAX_DENSITY of the tiles the kernel runs with (``_tiles``) are kept. Measured
#: (docs/benchmarks.md, "auto backend: block-sparse vs SDPA below DENSE_LIMIT"; 2 threads, D=64): every point from
#: T=256 with at most half of those tiles kept went to the kernel (2-7x faster at T=1024), also where coarse
#: 128-tiles look dense (a 32+32 window at T=512 keeps 62% of them but 23% of the 64 x 32 tiles run); BigBird at
#: T=256 keeping 64% went to SDPA by 1.3-1.4x in the quietest run; at T=128 every spec kept over half its tiles
AUTO_MIN_LENGTH_VS_SDPA = 256
#: the tiles the backend runs with at T >= 4 * AUTO_BLOCK (32 x 32 below): 64 query rows keep a block's logits
#: (8 heads x 64 x ~600 keys) in L2, and 32-key tiles follow a window's edges to 1.12x its kept pairs (1 CPU
#: thread, T=16K: 64 x 32 measured as fast as 64 x 16 and faster than 128 x 32 or 64 x 64)
AUTO_TILES = (64, 32)


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


#: prefers_block_sparse's answers by (spec repr, lengths, rival): ``auto`` asks on every call, and a layer passes
#: the same pattern each time; building even a closed-form layout costs about as much as a short call's setup
_PREFERS_BY_REPR: dict = {}


def _tiles(q_len: int, kv_len: int) -> tuple[int, int]:
    """The (block_q, block_k) tiles the ``block_sparse`` backend runs with at these lengths."""
    return AUTO_TILES if max(q_len, kv_len) >= 4 * AUTO_BLOCK else (32, 32)


def prefers_block_sparse(spec: MaskSpec | None, q_len: int, kv_len: int, *, rival: str = "tiled") -> bool:
    """Whether ``softmax_attention(backend="auto")`` should run this kernel rather than ``rival``: a spec built
    only from closed-form parts (windows, global tokens, Sparse Transformer, BigBird, block layouts, causal) that
    keeps few of its tiles, with a bounded number of key tiles per query block.

    ``rival="tiled"`` (above ``DENSE_LIMIT``): judged on ``AUTO_BLOCK`` tiles; denser masks gain little from
    skipping tiles, and wide ones would pay for the gathers in memory; the tiled backend serves both.
    ``rival="sdpa"`` (below it, SDPA over a dense mask): ``max(q_len, kv_len) >= AUTO_MIN_LENGTH_VS_SDPA`` and
    judged on the tiles this kernel runs with, since SDPA computes every tile whatever their size."""
    check_choice("rival", rival, ("tiled", "sdpa"))
    if spec is None or type(spec) is Causal or not _closed(spec):
        return False
    if rival == "sdpa" and max(q_len, kv_len) < AUTO_MIN_LENGTH_VS_SDPA:
        return False
    key = (repr(spec), q_len, kv_len, rival) if _described_by_repr(spec) else None
    if key is not None and key in _PREFERS_BY_REPR:
        return _PREFERS_BY_REPR[key]
    block_q, block_k = (AUTO_BLOCK, AUTO_BLOCK) if rival == "tiled" else _tiles(q_len, kv_len)
    kept = (spec.block_layout(q_len, kv_len, block_q, block_k) != EMPTY).flatten(0, 1).any(0)  # (nQ, nK)
    wide = float(kept.sum(-1).float().mean()) * block_k / AUTO_BLOCK  # key tiles per query block, AUTO_BLOCK wide
    answer = float(kept.float().mean()) <= AUTO_MAX_DENSITY and wide <= AUTO_MAX_TILES
    if key is not None:
        if len(_PREFERS_BY_REPR) >= 64:
            _PREFERS_BY_REPR.pop(next(iter(_PREFERS_BY_REPR)))
        _PREFERS_BY_REPR[key] = answer
    return answer


def _backend(q, k, v, *, mask, bias, scale, softcap):
    """``softmax_attention(backend="block_sparse")``: masks only (no bias or softcap)."""
    if bias is not None or softcap is not None:
        raise ValueError("backend: 'block_sparse' takes a mask only; use backend='tiled' with a bias or softcap")
    block_q, block_k = _tiles(q.shape[1], k.shape[1])
    plan = None
    if mask is not None and _described_by_repr(mask):
        key = (repr(mask), q.shape[1], k.shape[1], block_q, block_k, str(q.device))
        if key not in _PLANS_BY_REPR:
            if len(_PLANS_BY_REPR) >= 8:
                _PLANS_BY_REPR.pop(next(iter(_PLANS_BY_REPR)))
            _PLANS_BY_REPR[key] = plan_blocks(mask, q.shape[1], k.shape[1], block_q, block_k, device=q.device)
        plan = _PLANS_BY_REPR[key]
    elif mask is not None:
        plan = cached_plan(mask, q.shape[1], k.shape[1], block_q, block_k, device=q.device)
    return block_sparse_attention(q, k, v, mask, scale=scale, block_q=block_q, block_k=block_k, plan=plan)


def _register_backend() -> None:
    from hybridattn.ops.softmax_attention import BACKENDS

    BACKENDS.setdefault("block_sparse", _backend)


_register_backend()
