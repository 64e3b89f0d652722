"""Classic softmax-attention variants, side by side. Each returns ``o [B, Tq, Hq, Dv]``.

- Luong dot (Luong et al. 2015):        ``s_ij = q_i . k_j``                     (no 1/sqrt(D) scale)
- Luong general (bilinear):             ``s_ij = q_i^T W k_j``                   (``W [Dq, Dk]``)
- Bahdanau additive (Bahdanau 2015):    ``s_ij = v_a^T tanh(W_q q_i + W_k k_j)`` (``W_q [Dq, A]``, ``W_k [Dk, A]``)
- logit softcap (Gemma 2):              ``s_ij = c tanh(q_i . k_j / (sqrt(D) c))``
- attention sinks (StreamingLLM; gpt-oss's learned per-head sink logit ``z_h``):
  ``p_ij = exp(s_ij) / (exp(z_h) + sum_j exp(s_ij))`` — the sink takes probability mass but adds no value.

Dot, general and softcap reduce to ``softmax_attention`` (so every backend and mask spec applies). Additive
scores are not a dot product, so SDPA cannot run them; the ``[Tq, Tk, A]`` tanh tensor is built one query chunk at
a time and recomputed in the backward pass (activation checkpointing), so memory is ``O(Tq Tk + chunk Tk A)``
rather than ``O(Tq Tk A)``. Sinks need the log-sum-exp, so they use the dense scores.

Shape legend: B batch, Tq / Tk query / key length, Hq / Hkv heads (Hq % Hkv == 0), Dq / Dk / Dv head dims,
A additive attention width.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from hybridattn.ops._checks import (
    check_bthd,
    check_heads_divisible,
    check_positive_int,
    check_qkv,
    check_same,
    check_shape,
    check_tensor,
)
from hybridattn.ops.masks import Causal, as_mask_spec
from hybridattn.ops.softmax_attention import (
    check_spec_dims,
    accumulation_dtype,
    dense_scores,
    finish_scores,
    safe_softmax,
    softmax_attention,
    weighted_values,
)

__all__ = [
    "attention_with_sinks",
    "bahdanau_attention",
    "luong_dot_attention",
    "luong_general_attention",
    "softcap_attention",
]

#: Most elements of one chunk's ``tanh`` tensor in Bahdanau attention (16 MiB of fp32).
ADDITIVE_CHUNK_ELEMS = 2**22


def luong_dot_attention(q, k, v, *, causal: bool = False, mask=None, backend: str = "auto"):
    """Luong dot attention: unscaled ``q . k`` logits. Args / Raises as in ``softmax_attention``.

    Returns:
        ``o [B, Tq, Hq, Dv]``.
    """
    return softmax_attention(q, k, v, causal=causal, mask=mask, scale=1.0, backend=backend)


def luong_general_attention(q, k, v, weight, *, causal: bool = False, mask=None, backend: str = "auto"):
    """Luong general (bilinear) attention, ``s_ij = q_i^T W k_j``, computed as ``(q W) . k``.

    Args:
        q: ``[B, Tq, Hq, Dq]``; ``k`` ``[B, Tk, Hkv, Dk]``; ``v`` ``[B, Tk, Hkv, Dv]``.
        weight: ``W`` ``[Dq, Dk]`` shared by all heads, or ``[Hq, Dq, Dk]`` per query head.
        causal, mask, backend: as in ``softmax_attention``.

    Returns:
        ``o [B, Tq, Hq, Dv]``.

    Raises:
        TypeError / ValueError: as in ``softmax_attention``, or a ``weight`` whose shape does not match.
    """
    _, _, hq, dq = check_bthd("q", q)
    dk = check_bthd("k", k)[3]
    check_tensor("weight", weight)
    check_same("weight", "q", weight, q)
    if weight.dim() == 2:
        check_shape("weight", weight, (dq, dk))
        qw = q @ weight  # (B, Tq, Hq, Dk)
    else:
        check_shape("weight", weight, (hq, dq, dk))
        qw = torch.einsum("bthd,hde->bthe", q, weight)
    return softmax_attention(qw, k, v, causal=causal, mask=mask, scale=1.0, backend=backend)


def softcap_attention(q, k, v, *, softcap: float, causal: bool = False, mask=None, scale: float | None = None,
                      backend: str = "auto"):
    """Logit-softcapped attention, ``s = c tanh(scale q . k / c)``; the same as
    ``softmax_attention(..., softcap=c)``, named for discoverability. Args / Returns / Raises as there."""
    return softmax_attention(q, k, v, causal=causal, mask=mask, scale=scale, softcap=softcap, backend=backend)


def _mask_spec(mask, causal, batch, heads, tq, tk):
    spec = None if mask is None else as_mask_spec(mask, "mask")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, received {type(causal).__name__}")
    if causal:
        spec = Causal() if spec is None else Causal() & spec
    if spec is not None:
        check_spec_dims("mask", spec, batch, heads)
        spec.mask_mod(tq, tk)
    return spec


def _additive_scores(qa, ka, v_a):
    """``v_a . tanh(qa_i + ka_j)`` for one query chunk: qa ``[B, c, Hq, A]``, ka ``[B, Tk, Hq, A]`` ->
    ``[B, c, Tk, Hq]``."""
    return torch.tanh(qa[:, :, None] + ka[:, None]) @ v_a


def bahdanau_attention(q, k, v, w_q, w_k, v_a, *, causal: bool = False, mask=None, chunk_size: int | None = None):
    """Bahdanau additive attention, ``s_ij = v_a^T tanh(W_q q_i + W_k k_j)``.

    Args:
        q: ``[B, Tq, Hq, Dq]``; ``k`` ``[B, Tk, Hkv, Dk]``; ``v`` ``[B, Tk, Hkv, Dv]`` (Hq % Hkv == 0).
        w_q: ``[Dq, A]``; ``w_k``: ``[Dk, A]``; ``v_a``: ``[A]`` (shared by all heads).
        causal, mask: as in ``softmax_attention``.
        chunk_size: query rows per chunk of the ``tanh`` tensor; default keeps a chunk near 2^22 elements.

    Returns:
        ``o [B, Tq, Hq, Dv]``; fully masked rows are zeros.

    Raises:
        TypeError / ValueError: bad tensors, head counts, weight shapes, mask, or chunk size.
    """
    b, tq, hq, dq = check_bthd("q", q)
    bk, tk, hkv, dk = check_bthd("k", k)
    bv, tv, hv, _ = check_bthd("v", v)
    if (bk, bv, tv, hv) != (b, b, tk, hkv):
        raise ValueError(f"v: expected [B={b}, Tk={tk}, Hkv={hkv}, Dv] to match k, received shape {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v), ("w_q", w_q), ("w_k", w_k), ("v_a", v_a)):
        check_tensor(name, t)
        check_same(name, "q", t, q)
    check_heads_divisible("q", hq, "k", hkv)
    if v_a.dim() != 1:
        raise ValueError(f"v_a: expected shape [A], received {tuple(v_a.shape)}")
    a = v_a.shape[0]
    check_shape("w_q", w_q, (dq, a))
    check_shape("w_k", w_k, (dk, a))
    spec = _mask_spec(mask, causal, b, hq, tq, tk)
    acc = accumulation_dtype(q.dtype)
    if chunk_size is None:
        chunk_size = max(1, ADDITIVE_CHUNK_ELEMS // max(1, b * tk * hq * a))
    check_positive_int("chunk_size", chunk_size)

    qa = q.to(acc) @ w_q.to(acc)  # (B, Tq, Hq, A)
    ka = (k.to(acc) @ w_k.to(acc)).repeat_interleave(hq // hkv, dim=2)  # (B, Tk, Hq, A)
    va = v_a.to(acc)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, w_q, w_k, v_a))
    rows = []
    for start in range(0, tq, chunk_size):
        qc = qa[:, start:start + chunk_size]
        # recompute the [c, Tk, A] tanh in backward instead of keeping Tq x Tk x A activations alive
        rows.append(checkpoint(_additive_scores, qc, ka, va, use_reentrant=False) if grad
                    else _additive_scores(qc, ka, va))
    s = torch.cat(rows, dim=1).permute(0, 3, 1, 2) if rows else qa.new_zeros(b, hq, 0, tk)  # (B, Hq, Tq, Tk)
    s, _ = finish_scores(s, mask=spec, bias=None, softcap=None)
    return weighted_values(safe_softmax(s), v).to(q.dtype)


def attention_with_sinks(q, k, v, sinks, *, causal: bool = False, mask=None, scale: float | None = None):
    """Softmax attention with a learned sink logit per query head that absorbs probability mass.

    Args:
        q, k, v: as in ``softmax_attention``.
        sinks: ``[Hq]`` sink logits ``z_h``.
        causal, mask, scale: as in ``softmax_attention``.

    Returns:
        ``o [B, Tq, Hq, Dv]``: ``sum_j p_ij v_j`` with ``p_ij = exp(s_ij) / (exp(z_h) + sum_j exp(s_ij))``.

    Raises:
        TypeError / ValueError: as in ``softmax_attention``, or ``sinks`` not ``[Hq]``.
    """
    b, tq, hq, d, tk, _, _ = check_qkv(q, k, v)
    check_tensor("sinks", sinks)
    check_same("sinks", "q", sinks, q)
    check_shape("sinks", sinks, (hq,))
    spec = _mask_spec(mask, causal, b, hq, tq, tk)
    scale = d**-0.5 if scale is None else float(scale)
    s, _ = dense_scores(q, k, mask=spec, bias=None, scale=scale, softcap=None)
    # softmax over [s, z] restricted to s is softmax(s) * sigmoid(lse(s) - z). A fully masked row has
    # lse = -inf; logsumexp's own backward would give NaN there, so build lse from a guarded maximum.
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    total = torch.exp(s - m).sum(dim=-1, keepdim=True)
    kept = total > 0
    lse = torch.where(kept, m + torch.log(torch.where(kept, total, torch.ones_like(total))), float("-inf"))
    keep_mass = torch.sigmoid(lse - sinks.to(s.dtype).view(1, hq, 1, 1))
    return (weighted_values(safe_softmax(s), v) * keep_mass.transpose(1, 2)).to(q.dtype)
