"""Gated linear attention (GLA): a log-decay per key channel, data dependent.

The recurrence every form implements, per value head with a state ``S [Dk, Dv]``::

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T       # gk_t [Dk], <= 0
    o_t = S_t^T (scale q_t)

so ``o_i = sum_{j <= i} A[i, j] v_j`` with ``A[i, j] = scale sum_d q_id k_jd exp(G_id - G_jd)`` (``G`` the
cumulative log-decay), plus the initial state's share ``(scale q_i * exp(G_i))^T S_0``.

Forms, side by side (``mode=``), all returning ``(o, final_state)``:

- ``"recurrent"``: the loop above, token by token; the reference and the decoding form.
- ``"parallel"``: builds ``A [T, T]`` channel by channel (``O(T^2 Dk)`` memory in blocks of query rows); returns
  it on request (``return_attention=True``).
- ``"chunk"``: chunkwise-parallel with chunk-local ``G``. Per-channel decays do not factor out of ``q . k`` the
  way a scalar does, so each chunk is split into sub-chunks of 16 and query sub-chunk ``a`` uses the reference
  ``R_a`` (``G`` just before it): ``A[i, j] = (q_i exp(G_i - R_a)) . (k_j exp(R_a - G_j))``, one matmul. For keys
  in earlier sub-chunks both exponents are ``<= 0``; inside sub-chunk ``a`` the key factor grows up to
  ``exp(span_a)`` (``span_a`` the decay across the sub-chunk), which is exact while ``span_a`` stays below a
  dtype-dependent bound (then the key factors are built as ``exp(R_b - G_j) exp(R_a - R_b)``, one pass over k).
  Sub-chunks past the bound (very strong gates) get their diagonal blocks from an exact per-pair computation
  instead, so the result is exact for any gate.

Shape legend: B batch, T tokens, Hk query/key heads, Hv value heads (GVA: ``Hv % Hk == 0``, value head ``h``
reads key head ``h // (Hv // Hk)``), Dk key dim, Dv value dim, N packed sequences (``cu_seqlens``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridattn.ops._gated_linear import gated_op

# Largest decay across one sub-chunk for which exp(+span) (keys) and exp(-span) (queries) stay accurate:
# exp(+-30) is far from float32's range (1e+-38); float64 has room for far more.
_SPAN_LIMIT = {torch.float64: 300.0}
_SPAN_LIMIT_DEFAULT = 30.0


def _sub_chunk_size(c: int) -> int:
    return next(s for s in (16, 8, 4, 2, 1) if c % s == 0)


def _exact_diagonal_blocks(q, k, G):
    """``[.., n, s, s]``: ``sum_d q_id k_jd exp(G_id - G_jd)`` for ``j <= i`` inside each sub-chunk, one
    diagonal offset at a time (exact for any decay; ``s`` elementwise passes over q)."""
    s = q.shape[-2]
    out = q.new_zeros(*q.shape[:-1], s)
    for off in range(s):
        w = (q[..., off:, :] * k[..., :s - off, :] * (G[..., off:, :] - G[..., :s - off, :]).exp()).sum(-1)
        out = out + torch.diag_embed(w, offset=-off)
    return out


def per_channel_intra_chunk(q, k, G):
    """``A [B, H, Nc, C, C]`` for per-channel log-decays: ``q, k, G`` are ``[B, H, Nc, C, Dk]``, ``G``
    chunk-local cumulative (decreasing, <= 0)."""
    c = q.shape[-2]
    s = _sub_chunk_size(c)
    n = c // s
    q5, k5, G5 = (x.unflatten(-2, (n, s)) for x in (q, k, G))  # [.., Nc, n, s, Dk]
    ref = F.pad(G5[..., :-1, -1, :], (0, 0, 1, 0))  # [.., Nc, n, Dk]: G just before each sub-chunk
    span = (ref - G5[..., -1, :]).amax(-1)  # [.., Nc, n]
    limit = _SPAN_LIMIT.get(q.dtype, _SPAN_LIMIT_DEFAULT)
    q_ref = q5 * (G5 - ref.unsqueeze(-2)).exp()
    unsafe = span > limit
    if not bool(unsafe.any()):
        # every k_j exp(R_a - G_j) factors as k_j exp(R_b - G_j) (its own sub-chunk b, bounded by exp(span_b))
        # times exp(R_a - R_b) (<= 1 for b <= a, masked for b > a): one pass over k and an [n, n] table
        # instead of n passes of exp
        k_own = k5 * (ref.unsqueeze(-2) - G5).exp()  # [.., Nc, n, s, Dk]
        earlier = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # [a, b]: b <= a
        cross = (ref.unsqueeze(-2) - ref.unsqueeze(-3)).masked_fill(~earlier[..., None], float("-inf")).exp()
        k_ref = (k_own.unsqueeze(-4) * cross.unsqueeze(-2)).flatten(-3, -2)  # [.., Nc, n(query), C(key), Dk]
        return (q_ref @ k_ref.transpose(-1, -2)).flatten(-3, -2).tril()
    # some sub-chunk decays past the bound: keys are referred to each query sub-chunk directly (exponents <= 0
    # off the diagonal blocks), the clamp only bites in the diagonal blocks, which are then computed exactly
    key_pos = torch.arange(c, device=q.device)
    visible = key_pos[None, :] < (torch.arange(1, n + 1, device=q.device) * s)[:, None]  # [n, C]
    k_ref = k.unsqueeze(-3) * (ref.unsqueeze(-2) - G.unsqueeze(-3)).clamp(max=limit).exp()
    k_ref = k_ref * visible[..., None].to(k.dtype)
    A = (q_ref @ k_ref.transpose(-1, -2)).flatten(-3, -2).tril()  # [.., Nc, C, C]
    exact = _exact_diagonal_blocks(q5, k5, G5)  # [.., Nc, n, s, s]
    block_diag = torch.eye(n, dtype=torch.bool, device=q.device)[:, None, :, None]  # [n, 1, n, 1]
    replace = block_diag & unsafe[..., :, None, None, None]
    A = torch.where(replace, exact.unsqueeze(-2), A.view(*A.shape[:-2], n, s, n, s)).view(A.shape)
    return A


def per_channel_pair_weights(q, k, G, *, block: int = 64):
    """``A [B, H, T, T]`` for per-channel log-decays over the whole sequence (``G`` may be float64), built one
    block of query rows at a time so memory stays ``O(block T Dk)``."""
    t = q.shape[-2]
    key_pos = torch.arange(t, device=q.device)
    rows = []
    for start in range(0, t, block):
        stop = min(t, start + block)
        diff = G[..., start:stop, None, :] - G[..., None, :, :]  # [B, H, b, T, Dk]
        causal = key_pos[None, :] <= torch.arange(start, stop, device=q.device)[:, None]
        decay = diff.masked_fill(~causal[..., None], float("-inf")).exp().to(q.dtype)
        rows.append((q[..., start:stop, None, :] * k[..., None, :, :] * decay).sum(-1))
    return torch.cat(rows, dim=-2) if rows else q.new_zeros(*q.shape[:-2], 0, 0)


def gla(q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False, mode="chunk", chunk_size=64,
        cu_seqlens=None, return_attention=False):
    """Gated linear attention with a log-decay per key channel (fla's ``chunk_gla``).

    ``S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``.

    Args:
        q, k: ``[B, T, Hk, Dk]``.
        v: ``[B, T, Hv, Dv]`` with ``Hv % Hk == 0``.
        gk: ``[B, T, Hv, Dk]`` log-decays ``<= 0`` per key channel (``-inf`` allowed).
        scale, initial_state, output_final_state, mode, chunk_size, cu_seqlens, return_attention: as
            :func:`~hybridattn.ops.simple_gla.simple_gla` (state ``[B|N, Hv, Dk, Dv]``).

    Returns:
        ``(o [B, T, Hv, Dv] in q's dtype, final_state [B|N, Hv, Dk, Dv] or None)``; with
        ``return_attention=True`` a third entry ``A [B, Hv, T, T]``. States are kept in at least float32.

    Raises:
        TypeError, ValueError: as :func:`~hybridattn.ops.simple_gla.simple_gla` (for ``gk`` instead of ``g``).
    """
    return gated_op(q, k, v, gk, gate_name="gk", per_channel=True, intra_chunk=per_channel_intra_chunk,
                    pair_weights=per_channel_pair_weights, scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state, mode=mode, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                    return_attention=return_attention)
