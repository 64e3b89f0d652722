"""DeepSeek Sparse Attention (DeepSeek-V3.2): a lightning indexer picks ``top_k`` keys per query, and softmax
attention runs over those keys only.

Indexer score of query ``t`` for key ``s`` (a few small indexer heads ``j``, ReLU-weighted dot products):

    I[t, s] = sum_j w[t, j] * relu(index_q[t, j] . index_k[s])

Each query keeps the ``top_k`` keys of highest ``I`` among those it may see (causal: ``s <= t + Tk - Tq``), shared
by all attention heads, and attends to them:

    o[t, h] = sum_{s in top_k(t)} softmax_s(scale * q[t, h] . k[s, h // G]) v[s, h // G]

The selection is discrete, so no gradient reaches the indexer through ``o``. DeepSeek trains the indexer with a
KL loss (:func:`indexer_kl_loss`, the sparse-training stage of DeepSeek-V3.2) against the main attention over each
query's selected keys ``S_t``:

    p[t, s]  = sum_h P[t, h, s] / sum_{s' in S_t} sum_h P[t, h, s']     (main attention P, detached)
    L        = mean_t KL(p[t, S_t] || softmax_{s in S_t}(I[t, s]))

``dsa_attention(..., return_indices=True, return_weights=True)`` returns ``S_t`` and ``P`` of the same pass, so
the loss needs no second attention pass. The fast path never builds the ``Tq x Tk`` softmax:
indexer scores are made ``chunk_size`` query rows at a time (only their top-k survive), and attention gathers
the selected keys, ``O(Tq * top_k)`` work and memory.

Shape legend: B batch, Tq / Tk query / key length, H query heads, Hkv key-value heads (G = H / Hkv), D head dim,
Dv value head dim, Hi indexer heads, Di indexer head dim, K = min(top_k, Tk) selected keys.
"""

from __future__ import annotations

import torch

from hybridattn.ops._checks import (
    check_bthd, check_positive_int, check_qkv, check_same, check_scale, check_shape, check_tensor,
)

__all__ = ["dsa_attention", "dsa_attention_reference", "indexer_kl_loss", "indexer_kl_loss_reference",
           "lightning_indexer", "select_top_k", "top_k_stable"]


def _check_indexer(q, k, index_q, index_k, index_weights):
    b, tq = q.shape[:2]
    tk = k.shape[1]
    bi, tqi, hi, di = check_bthd("index_q", index_q)
    if index_q.device != q.device:
        raise ValueError(f"index_q: expected device {q.device} (the device of q), received {index_q.device}")
    if (bi, tqi) != (b, tq):
        raise ValueError(f"index_q: expected [B={b}, Tq={tq}, Hi, Di], received shape {tuple(index_q.shape)}")
    check_tensor("index_k", index_k, ndim=3)
    check_same("index_k", "index_q", index_k, index_q)
    check_shape("index_k", index_k, (b, tk, di))
    if index_weights is None:
        return index_q.new_ones(b, tq, hi)
    check_tensor("index_weights", index_weights, ndim=3)
    check_same("index_weights", "index_q", index_weights, index_q)
    check_shape("index_weights", index_weights, (b, tq, hi))
    return index_weights


def lightning_indexer(index_q, index_k, index_weights, *, q_start: int = 0, q_end: int | None = None):
    """Indexer scores ``[B, q_end - q_start, Tk]`` for query rows ``q_start:q_end`` (see module docstring)."""
    qi = index_q[:, q_start:q_end]  # (B, C, Hi, Di)
    s = torch.relu(torch.einsum("bchd,bsd->bchs", qi, index_k))  # (B, C, Hi, Tk)
    return torch.einsum("bchs,bch->bcs", s, index_weights[:, q_start:q_end])


def top_k_stable(scores: torch.Tensor, k: int):
    """``topk`` along the last dim with ties going to the earlier key (``torch.topk`` leaves ties to the
    implementation, and ReLU scores tie at 0 often, so selections would differ between a prefill and a decode
    step). Returns ``(values, indices)``."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def select_top_k(index_q, index_k, index_weights, *, top_k: int, causal: bool, kv_len: int, chunk_size: int = 256,
                 key_mask=None):
    """Indices ``[B, Tq, K]`` of each query's ``top_k`` highest-scoring visible keys and a validity mask
    ``[B, Tq, K]`` (False where a query sees fewer than ``K`` keys). Computed without gradients."""
    b, tq = index_q.shape[:2]
    kk = min(top_k, kv_len)
    offset = kv_len - tq
    idx_chunks, ok_chunks = [], []
    with torch.no_grad():
        for start in range(0, tq, chunk_size):
            end = min(tq, start + chunk_size)
            scores = lightning_indexer(index_q, index_k, index_weights, q_start=start, q_end=end)
            if scores.dtype in (torch.float16, torch.bfloat16):
                scores = scores.float()  # rank in fp32: half precision would create ties
            if causal:
                rows = torch.arange(start, end, device=scores.device)[:, None] + offset
                visible = torch.arange(kv_len, device=scores.device)[None, :] <= rows
                scores = scores.masked_fill(~visible, float("-inf"))
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
            values, indices = top_k_stable(scores, kk)
            idx_chunks.append(indices)
            ok_chunks.append(torch.isfinite(values))
    return torch.cat(idx_chunks, 1), torch.cat(ok_chunks, 1)


def dsa_attention(q, k, v, index_q, index_k, *, top_k: int, causal: bool = True, index_weights=None,
                  scale: float | None = None, chunk_size: int = 256, key_mask=None, return_indices: bool = False,
                  return_weights: bool = False):
    """DeepSeek Sparse Attention: softmax attention over each query's ``top_k`` keys chosen by the indexer.

    Args:
        q: queries ``[B, Tq, H, D]``.
        k: keys ``[B, Tk, Hkv, D]`` (``H % Hkv == 0``).
        v: values ``[B, Tk, Hkv, Dv]``.
        index_q: indexer queries ``[B, Tq, Hi, Di]``.
        index_k: indexer keys ``[B, Tk, Di]`` (one per token, shared by the indexer heads). The indexer tensors
            share one dtype, which may differ from q's (DeepSeek runs the indexer in low precision).
        top_k: keys kept per query (> 0); with ``top_k >= Tk`` this is full (causal) attention.
        causal: queries see keys ``s <= t + Tk - Tq`` only.
        index_weights: per-query weights of the indexer heads ``[B, Tq, Hi]``; default all ones.
        scale: attention logit scale, default ``1 / sqrt(D)``.
        chunk_size: query rows whose indexer scores are held at once.
        key_mask: optional bool ``[B, Tk]``, False = a padding key that is never selected.
        return_indices: also return the selected key indices ``[B, Tq, K]`` and their validity mask.
        return_weights: also return the attention probabilities over the selected keys ``[B, Tq, H, K]`` (zero at
            invalid slots; differentiable), e.g. for :func:`indexer_kl_loss`.

    Returns:
        ``o`` ``[B, Tq, H, Dv]``; with ``return_indices`` ``(o, (indices, valid))``, with ``return_weights``
        ``(o, weights)``, with both ``(o, (indices, valid), weights)``. Rows without a visible key are zero.

    Raises:
        TypeError / ValueError: wrong types, shapes, dtypes or devices (the message names the argument).
    """
    b, tq, h, d, tk, hkv, dv = check_qkv(q, k, v)
    check_positive_int("top_k", top_k)
    check_positive_int("chunk_size", chunk_size)
    weights = _check_indexer(q, k, index_q, index_k, index_weights)
    scale = check_scale(scale, d)
    if tq == 0 or tk == 0:
        o = q.new_zeros(b, tq, h, dv) + 0 * (q.sum() + k.sum() + v.sum())
        empty = torch.zeros(b, tq, 0, dtype=torch.long, device=q.device)
        return _with_extras(o, (empty, empty.bool()), q.new_zeros(b, tq, h, 0), return_indices, return_weights)
    if key_mask is not None:
        check_tensor("key_mask", key_mask, ndim=2, floating=False)
        if key_mask.dtype != torch.bool:  # a float mask of 0/1 would be cast to True everywhere but exact zeros
            raise TypeError(f"key_mask: expected dtype torch.bool (False = padding), received {key_mask.dtype}")
        check_shape("key_mask", key_mask, (b, tk))
        key_mask = key_mask.to(device=q.device, dtype=torch.bool)
    idx, ok = select_top_k(index_q, index_k, weights, top_k=top_k, causal=causal, kv_len=tk, chunk_size=chunk_size,
                           key_mask=key_mask)
    kk = idx.shape[-1]
    # gather the selected rows of the flattened (B*Tk) key / value tables
    flat = (idx + torch.arange(b, device=q.device)[:, None, None] * tk).flatten()
    k_sel = k.reshape(b * tk, hkv, d).index_select(0, flat).view(b, tq, kk, hkv, d)
    v_sel = v.reshape(b * tk, hkv, dv).index_select(0, flat).view(b, tq, kk, hkv, dv)
    qg = q.view(b, tq, hkv, h // hkv, d)  # (B, Tq, Hkv, G, D)
    s = scale * torch.einsum("btngd,btknd->btngk", qg, k_sel)  # (B, Tq, Hkv, G, K)
    s = s.masked_fill(~ok[:, :, None, None, :], float("-inf"))
    # rows with no valid slot: subtract 0 instead of -inf and divide by 1, giving zeros rather than NaN
    m = s.amax(-1, keepdim=True).detach()
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.einsum("btngk,btknd->btngd", p, v_sel).reshape(b, tq, h, dv)
    return _with_extras(o, (idx, ok), p.reshape(b, tq, h, kk), return_indices, return_weights)


def _with_extras(o, selection, weights, return_indices: bool, return_weights: bool):
    extras = ((selection,) if return_indices else ()) + ((weights,) if return_weights else ())
    return (o, *extras) if extras else o


def _indexer_logits_at(index_q, index_k, index_weights, indices):
    """Indexer scores ``I[t, s]`` at the selected keys only, ``[B, Tq, K]`` (float32 or wider)."""
    b, tq, kk = indices.shape
    tk, di = index_k.shape[1], index_k.shape[2]
    flat = (indices + torch.arange(b, device=indices.device)[:, None, None] * tk).flatten()
    k_sel = index_k.reshape(b * tk, di).index_select(0, flat).view(b, tq, kk, di)  # (B, Tq, K, Di)
    s = torch.relu(torch.einsum("bthd,btkd->bthk", index_q, k_sel))  # (B, Tq, Hi, K)
    logits = torch.einsum("bthk,bth->btk", s, index_weights)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _kl_to_indexer(target, logits, valid, query_mask):
    """``mean_t KL(target[t] || softmax(logits[t]))`` over the slots ``valid`` ``[B, Tq, K]``, for rows with a
    valid slot (and ``query_mask`` True). ``target`` rows sum to 1 over their valid slots."""
    rows = valid.any(-1)
    if query_mask is not None:
        rows = rows & query_mask
    # a row without valid slots gets finite logits (its target is all zero) so that log_softmax has no NaN
    logits = logits.masked_fill(~valid, float("-inf")).masked_fill(~rows[..., None], 0.0)
    log_q = torch.log_softmax(logits, dim=-1)
    # xlogy: 0 log 0 = 0; log_q is -inf where the target is 0, so it is zeroed there before the product
    kl = (torch.xlogy(target, target) - target * log_q.masked_fill(target == 0, 0.0)).sum(-1)  # (B, Tq)
    return (kl * rows).sum() / rows.sum().clamp_min(1)


def indexer_kl_loss(index_q, index_k, index_weights, indices, valid, attn_weights, *, query_mask=None):
    """DeepSeek-V3.2's indexer loss over each query's selected keys (sparse-training stage), mean over queries.

    The target ``p`` is the main attention summed over heads and L1-normalised over the selected keys, detached;
    the indexer distribution is the softmax of its scores over the same keys. Gradients reach only
    ``index_q`` / ``index_k`` / ``index_weights``.

    Args:
        index_q, index_k, index_weights: as :func:`dsa_attention` (``index_weights`` ``[B, Tq, Hi]`` or None).
        indices, valid: ``[B, Tq, K]`` selected keys and their validity (``return_indices`` of the same call).
        attn_weights: ``[B, Tq, H, K]`` main attention over those keys (``return_weights`` of the same call).
        query_mask: optional bool ``[B, Tq]``, False = a padded query left out of the mean.

    Returns:
        A scalar (float32, or float64 for float64 inputs); 0 when no query has a selected key.

    Raises:
        ValueError / TypeError: mismatched shapes (the message names the argument).
    """
    check_tensor("indices", indices, ndim=3, floating=False)
    b, tq, kk = indices.shape
    check_shape("valid", valid, (b, tq, kk))
    check_tensor("attn_weights", attn_weights, ndim=4)
    check_shape("attn_weights", attn_weights, (b, tq, attn_weights.shape[2], kk))
    check_tensor("index_q", index_q, ndim=4)
    check_shape("index_q", index_q, (b, tq, *index_q.shape[2:]))
    check_tensor("index_k", index_k, ndim=3)
    check_shape("index_k", index_k, (b, index_k.shape[1], index_q.shape[-1]))
    if index_weights is None:
        index_weights = index_q.new_ones(index_q.shape[:3])
    check_shape("index_weights", index_weights, index_q.shape[:3])
    if query_mask is not None:
        check_shape("query_mask", query_mask, (b, tq))
    logits = _indexer_logits_at(index_q, index_k, index_weights, indices)
    target = attn_weights.detach().to(logits.dtype).sum(2) * valid  # (B, Tq, K)
    target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)
    return _kl_to_indexer(target, logits, valid.bool(), query_mask)


def dsa_attention_reference(q, k, v, index_q, index_k, *, top_k: int, causal: bool = True, index_weights=None,
                            scale: float | None = None):
    """Dense reference in float64: the full indexer matrix, a dense ``[B, 1, Tq, Tk]`` mask of each row's
    ``top_k`` visible keys, and masked softmax attention over the whole ``Tq x Tk`` matrix."""
    b, tq, h, d, tk, hkv, dv = check_qkv(q, k, v)
    weights = _check_indexer(q, k, index_q, index_k, index_weights)
    _, keep = _dense_selection(index_q, index_k, weights, top_k=top_k, causal=causal)
    w = _dense_attention(q, k, keep, scale)
    vh = v.double().repeat_interleave(h // hkv, dim=2)
    return torch.einsum("bhts,bshd->bthd", w, vh)


def _dense_selection(index_q, index_k, weights, *, top_k: int, causal: bool):
    """float64 indexer scores ``[B, Tq, Tk]`` (-inf where invisible) and the dense mask of each row's top-k."""
    b, tq, tk = index_q.shape[0], index_q.shape[1], index_k.shape[1]
    device = index_q.device
    scores = lightning_indexer(index_q.double(), index_k.double(), weights.double())  # (B, Tq, Tk)
    visible = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        visible = torch.arange(tk, device=device)[None, :] <= torch.arange(tq, device=device)[:, None] + tk - tq
    scores = scores.masked_fill(~visible, float("-inf"))
    values, indices = top_k_stable(scores, min(top_k, tk))
    keep = torch.zeros(b, tq, tk, dtype=torch.bool, device=device)
    keep.scatter_(-1, indices, torch.isfinite(values))
    return scores, keep


def _dense_attention(q, k, keep, scale):
    """float64 attention probabilities ``[B, H, Tq, Tk]`` over the kept pairs (fully masked rows: zeros)."""
    h, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    scale = check_scale(scale, d)
    kh = k.double().repeat_interleave(h // hkv, dim=2)
    logits = scale * torch.einsum("bthd,bshd->bhts", q.double(), kh)
    logits = logits.masked_fill(~keep[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def indexer_kl_loss_reference(q, k, index_q, index_k, *, top_k: int, causal: bool = True, index_weights=None,
                              scale: float | None = None, query_mask=None):
    """Dense float64 reference of :func:`indexer_kl_loss`: the whole ``Tq x Tk`` indexer and attention matrices,
    the target summed over heads and normalised over each row's kept keys, the indexer softmax over the same
    keys, then ``mean_t KL``."""
    b, tq, h, d = q.shape
    weights = _check_indexer(q, k, index_q, index_k, index_weights)
    scores, keep = _dense_selection(index_q, index_k, weights, top_k=top_k, causal=causal)
    p = _dense_attention(q, k, keep, scale).sum(1)  # (B, Tq, Tk), summed over heads
    p = p / p.sum(-1, keepdim=True)
    log_q = torch.log_softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    kl = torch.where(keep & (p > 0), p * (p.log() - log_q), 0.0).sum(-1)  # (B, Tq); NaN rows are not kept
    rows = keep.any(-1) if query_mask is None else keep.any(-1) & query_mask
    return kl[rows].mean() if bool(rows.any()) else kl.new_zeros(())
