"""Tiled (flash-style) softmax attention in pure torch: online softmax forward, recomputing backward.

For each block of ``block_q`` query rows the keys are visited in chunks; a running maximum ``m``, normaliser
``l`` and unnormalised output ``acc`` are rescaled as each chunk arrives (Milakov & Gimelshein 2018; Dao et al.
2022):

    m' = max(m, rowmax(s)),   p = exp(s - m'),   l' = l e^(m - m') + rowsum(p),   acc' = acc e^(m - m') + p v
    o = acc / l,              lse = m + log(l)

Only ``lse`` (one number per query row) is saved; the backward pass recomputes ``p = exp(s - lse)`` chunk by
chunk, with ``D = rowsum(dO * O)``:

    dV += p^T dO,   dS = p * (dO V^T - D),   dQ += scale dS K,   dK += scale dS^T Q

so memory is ``O(T * block)``, never ``O(Tq * Tk)``. The mask spec's ``block_layout`` decides the work: EMPTY
blocks are skipped entirely, FULL blocks get no mask, only PARTIAL blocks evaluate the mask (``dense_block``), so
a sparse pattern costs time in proportion to the blocks it keeps. Consecutive kept blocks of the same kind are
merged into one chunk up to ``tile_elems`` scores, which keeps Python overhead low on long rows. Biases are asked
for one tile at a time (``ScoreBias.block``) and their gradients, when they have learnable tensors
(``ScoreBias.grad_tensors``), are routed back through the recomputed tiles.

GQA/MQA: the ``G = Hq / Hkv`` query heads sharing a key/value head are stacked into the row dimension of one
matmul against that head's keys, so K and V are never repeated in memory. bf16/fp16 inputs run in fp32.

Shape legend: B batch, Tq / Tk query / key length, Hq / Hkv heads, G = Hq / Hkv, D, Dv head dims,
n rows in a query block, w columns in a key chunk.
"""

from __future__ import annotations

import torch

from hybridattn.ops._checks import check_positive_int
from hybridattn.ops.masks import EMPTY, FULL, MaskSpec
from hybridattn.ops.scores import ScoreBias
from hybridattn.ops.softmax_attention import accumulation_dtype

__all__ = ["tiled_attention"]

BLOCK_Q = 256
BLOCK_K = 128
#: Most scores held at once per chunk (``B * Hq * n * w``); 2^20 fp32 = 4 MiB per temporary, sized so that
#: a tile stays near the cache while rows are long enough to amortise Python overhead.
TILE_ELEMS = 2**20


def _chunks(mask: MaskSpec | None, tq, tk, block_q, block_k, width, device):
    """Per query block: a list of ``(k_start, k_end, needs_mask)`` chunks covering its non-EMPTY key blocks."""
    n_q = -(-tq // block_q)
    if mask is None:
        row = [(c, min(tk, c + width), False) for c in range(0, tk, width)]
        return [row] * n_q
    layout = mask.block_layout(tq, tk, block_q, block_k, device=device).flatten(0, 1)  # (B*H, nQ, nK)
    need = (layout != EMPTY).any(dim=0).tolist()
    full = (layout == FULL).all(dim=0).tolist()
    plan = []
    for need_row, full_row in zip(need, full):
        row = []
        for j, (keep, is_full) in enumerate(zip(need_row, full_row)):
            if not keep:
                continue
            k0, k1 = j * block_k, min(tk, (j + 1) * block_k)
            last = row[-1] if row else None
            if last and last[1] == k0 and last[2] == (not is_full) and k1 - last[0] <= width:
                row[-1] = (last[0], k1, last[2])
            else:
                row.append((k0, k1, not is_full))
        plan.append(row)
    return plan


def _per_head(t: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
    """``[B|1, Hq|1, n, w]`` -> ``[B|1, Hkv|1, G|1, n, w]`` to broadcast against grouped scores."""
    if t.shape[1] == 1:
        return t.unsqueeze(1)
    return t.unflatten(1, (hkv, g))


class _Problem:
    """Everything both passes need to rebuild the logits of one (query block, key chunk) tile."""

    def __init__(self, q, k, v, mask, bias, scale, softcap, block_q, block_k, tile_elems):
        b, self.tq, hq, _ = q.shape
        self.tk, self.hkv = k.shape[1], k.shape[2]
        self.g = hq // self.hkv
        self.acc = accumulation_dtype(q.dtype)
        self.mask, self.bias, self.scale, self.softcap = mask, bias, scale, softcap
        self.block_q = block_q
        width = max(block_k, (tile_elems // max(1, b * hq * block_q)) // block_k * block_k)
        self.plan = _chunks(mask, self.tq, self.tk, block_q, block_k, width, q.device)
        # (B, Hkv, G, Tq, D): the G query heads of one kv head are adjacent, so a block is one matmul's rows.
        # The scale is folded into q once instead of into every tile.
        self.qg = (q.to(self.acc) * scale).unflatten(2, (self.hkv, self.g)).permute(0, 2, 3, 1, 4)
        self.kg = k.to(self.acc).transpose(1, 2)  # (B, Hkv, Tk, D)
        self.vg = v.to(self.acc).transpose(1, 2)  # (B, Hkv, Tk, Dv)

    def q_block(self, i):
        r0, r1 = i * self.block_q, min(self.tq, (i + 1) * self.block_q)
        qi = self.qg[:, :, :, r0:r1]
        return r0, r1, qi.reshape(qi.shape[0], self.hkv, -1, qi.shape[-1])  # (B, Hkv, G*n, D)

    def logits(self, qi, r0, r1, c0, c1, needs_mask, *, bias_block=None, keep_tanh=False):
        """Scores of one tile ``(B, Hkv, G*n, w)`` and, with softcap and ``keep_tanh``, ``tanh`` of the raw logits
        (the backward pass needs it). Tiles are large and memory-bound, so the elementwise steps work in place."""
        s = qi @ self.kg[:, :, c0:c1].transpose(-1, -2)
        t = None
        if self.softcap is not None:
            if keep_tanh:
                t = s.div_(self.softcap).tanh_()
                s = t * self.softcap
            else:
                s.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.bias is None and not needs_mask:
            return s, t
        s5 = s.unflatten(2, (self.g, r1 - r0))  # (B, Hkv, G, n, w), a view of s
        if self.bias is not None:
            if bias_block is None:
                bias_block = self.bias_block(r0, r1, c0, c1, s.device)
            s5.add_(_per_head(bias_block, self.hkv, self.g))
        if needs_mask:
            keep = self.mask.dense_block(self.tq, self.tk, r0, r1, c0, c1, device=s.device)
            s5.masked_fill_(~_per_head(keep, self.hkv, self.g), float("-inf"))
        return s, t

    def bias_block(self, r0, r1, c0, c1, device):
        q_idx = torch.arange(r0, r1, device=device)
        kv_idx = torch.arange(c0, c1, device=device)
        return self.bias.block(self.tq, self.tk, q_idx, kv_idx, dtype=self.acc).to(device)

    def ungroup(self, x):
        """``(B, Hkv, G, T, E)`` -> ``(B, T, Hq, E)``."""
        return x.permute(0, 3, 1, 2, 4).flatten(2, 3)


def _forward(p: _Problem):
    b = p.qg.shape[0]
    dv = p.vg.shape[-1]
    out = p.qg.new_zeros(b, p.hkv, p.g, p.tq, dv)
    lse = p.qg.new_full((b, p.hkv, p.g, p.tq, 1), float("inf"))
    # a column of ones after V makes the matmul p @ [V, 1] also return rowsum(p): one pass over p less per tile
    v1 = torch.cat([p.vg, p.vg.new_ones(*p.vg.shape[:-1], 1)], dim=-1)  # (B, Hkv, Tk, Dv + 1)
    for i, row in enumerate(p.plan):
        if not row:
            continue  # every key masked: zeros, lse = +inf so that backward's exp(s - lse) is 0
        r0, r1, qi = p.q_block(i)
        m = acc = None  # acc[..., :Dv] is the unnormalised output, acc[..., Dv:] the normaliser l
        for c0, c1, needs_mask in row:
            s, _ = p.logits(qi, r0, r1, c0, c1, needs_mask)
            m_new = s.amax(dim=-1, keepdim=True) if m is None else torch.maximum(m, s.amax(dim=-1, keepdim=True))
            shift = m_new
            if needs_mask or p.bias is not None:
                # a row whose keys so far are all masked has m = -inf; shift by 0 there so exp gives 0, not NaN
                shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            pv = s.sub_(shift).exp_() @ v1[:, :, c0:c1]
            acc = pv if m is None else acc.mul_(torch.exp(m - shift)).add_(pv)
            m = m_new
        acc, l = acc[..., :dv], acc[..., dv:]
        kept = l > 0
        n = r1 - r0
        out[:, :, :, r0:r1] = (acc / torch.where(kept, l, torch.ones_like(l))).unflatten(2, (p.g, n))
        row_lse = torch.where(kept, m + torch.log(torch.where(kept, l, torch.ones_like(l))), float("inf"))
        lse[:, :, :, r0:r1] = row_lse.unflatten(2, (p.g, n))
    return out, lse


def _backward(p: _Problem, out, lse, d_out, bias_tensors):
    b = p.qg.shape[0]
    d_out = d_out.to(p.acc)
    delta = (d_out * out).sum(dim=-1, keepdim=True)  # (B, Hkv, G, Tq, 1)
    dq = torch.zeros_like(p.qg)
    dk = torch.zeros_like(p.kg)
    dv = torch.zeros_like(p.vg)
    d_bias = [torch.zeros_like(t) for t in bias_tensors]
    for i, row in enumerate(p.plan):
        if not row:
            continue
        r0, r1, qi = p.q_block(i)
        flat = lambda x: x[:, :, :, r0:r1].reshape(b, p.hkv, -1, x.shape[-1])  # noqa: E731
        do_i, lse_i, delta_i = flat(d_out), flat(lse), flat(delta)
        dq_i = torch.zeros_like(qi)
        for c0, c1, needs_mask in row:
            bias_block = None
            if bias_tensors:
                with torch.enable_grad():
                    bias_block = p.bias_block(r0, r1, c0, c1, qi.device)
            s, t = p.logits(qi, r0, r1, c0, c1, needs_mask, keep_tanh=True,
                            bias_block=None if bias_block is None else bias_block.detach())
            pr = s.sub_(lse_i).exp_()  # (B, Hkv, G*n, w)
            dv[:, :, c0:c1] += pr.transpose(-1, -2) @ do_i
            ds = (do_i @ p.vg[:, :, c0:c1].transpose(-1, -2)).sub_(delta_i).mul_(pr)
            if bias_tensors:
                # the bias was added after the softcap, so it receives dS itself, summed over broadcast dims
                g4 = ds.unflatten(2, (p.g, r1 - r0)).flatten(1, 2).sum_to_size(bias_block.shape)
                grads = torch.autograd.grad(bias_block, bias_tensors, g4, allow_unused=True)
                for acc_g, gr in zip(d_bias, grads):
                    if gr is not None:
                        acc_g += gr
            if t is not None:
                ds.mul_(t.mul_(t).neg_().add_(1))  # d(cap tanh(x / cap)) / dx = 1 - tanh^2
            dq_i += ds @ p.kg[:, :, c0:c1]
            dk[:, :, c0:c1] += ds.transpose(-1, -2) @ qi
        dq[:, :, :, r0:r1] = dq_i.unflatten(2, (p.g, r1 - r0))
    # q was pre-scaled, so dK = dS^T (scale Q) already; dQ still needs the scale
    return dq * p.scale, dk, dv, d_bias


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, options, *bias_tensors):
        p = _Problem(q, k, v, *options)
        out, lse = _forward(p)
        ctx.options = options
        ctx.save_for_backward(q, k, v, out, lse, *bias_tensors)
        return p.ungroup(out).to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, *bias_tensors = ctx.saved_tensors
        p = _Problem(q, k, v, *ctx.options)
        d_out = d_out.unflatten(2, (p.hkv, p.g)).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Tq, Dv)
        dq, dk, dv, d_bias = _backward(p, out, lse, d_out, tuple(bias_tensors))
        dq = p.ungroup(dq).to(q.dtype)
        return (dq, dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype), None, *d_bias)


def tiled_attention(q, k, v, *, mask: MaskSpec | None, bias: ScoreBias | None, scale: float,
                    softcap: float | None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                    tile_elems: int = TILE_ELEMS):
    """Tiled softmax attention on validated arguments (use ``softmax_attention(..., backend="tiled")``).

    Args:
        q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``, already validated.
        mask: a ``MaskSpec`` (causal already folded in) or None.
        bias: a ``ScoreBias`` or None.
        scale, softcap: as in ``softmax_attention``.
        block_q, block_k: granularity of the block layout (rows per query block, keys per key block).
        tile_elems: most scores per chunk; consecutive key blocks are merged up to this size.

    Returns:
        ``o`` ``[B, Tq, Hq, Dv]`` in q's dtype.

    Raises:
        TypeError / ValueError: block sizes that are not positive ints.
    """
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    check_positive_int("tile_elems", tile_elems)
    options = (mask, bias, scale, softcap, block_q, block_k, tile_elems)
    bias_tensors = bias.grad_tensors() if bias is not None else ()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *bias_tensors)):
        return _TiledAttention.apply(q, k, v, options, *bias_tensors)
    p = _Problem(q, k, v, *options)
    return p.ungroup(_forward(p)[0]).to(q.dtype)
