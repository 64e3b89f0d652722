"""Kernel (linear) attention: ``phi(Q) (phi(K)^T V)``, optionally normalised by ``phi(q) . sum phi(k)``.

The recurrence every form implements, per value head with a state ``S [M, Dv]`` (``M`` the feature dim)::

    S_t = S_{t-1} + phi(k_t) v_t^T
    o_t = S_t^T (scale phi(q_t))                              # normalize=False
    z_t = z_{t-1} + phi(k_t);  o_t = S_t^T phi(q_t) / (phi(q_t) . z_t)   # normalize=True (scale cancels)

It is :func:`~hybridattn.ops.simple_gla.simple_gla` with no decay, and runs on the same forms (``mode=``):
``"recurrent"`` (the loop above; the reference and the decoding form), ``"parallel"`` (``(scale phi(Q)
phi(K)^T)`` masked causally, returned on request), ``"chunk"`` (causal matmul inside chunks; between chunks the
state is a prefix sum, no sequential loop at all).

With ``normalize=True`` the denominator is carried as one extra value column of ones, so the state is
``[.., M, Dv + 1]`` (its last column is ``z``); a zero denominator (e.g. relu features all zero) gives a zero
output, not NaN.

Shape legend: B batch, T tokens, Hk query/key heads, Hv value heads (``Hv % Hk == 0``), Dk key dim, M feature
dim (``phi``'s output), Dv value dim, N packed sequences (``cu_seqlens``).
"""

from __future__ import annotations

import torch

from hybridattn.ops._gated_linear import check_initial_state, compute_dtype, run, validate
from hybridattn.ops.feature_maps import resolve_feature_map
from hybridattn.ops.simple_gla import scalar_decay_weights


def _features(phi, x: torch.Tensor, name: str) -> torch.Tensor:
    out = phi(x)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError(f"feature_map({name}): expected a floating-point tensor, received "
                        f"{getattr(out, 'dtype', type(out).__name__)}")
    if out.dim() != 4 or out.shape[:3] != x.shape[:3] or out.shape[-1] == 0:
        raise ValueError(f"feature_map({name}): expected shape [B, T, H, M] = {tuple(x.shape[:3])} + (M,), "
                         f"received {tuple(out.shape)}")
    return out


def linear_attention(q, k, v, *, feature_map="identity", normalize=False, scale=None, initial_state=None,
                     output_final_state=False, mode="chunk", chunk_size=64, cu_seqlens=None, return_attention=False):
    """Causal kernel attention ``o_t = scale phi(q_t)^T sum_{j <= t} phi(k_j) v_j^T`` (normalised on request).

    Args:
        q, k: ``[B, T, Hk, Dk]``.
        v: ``[B, T, Hv, Dv]`` with ``Hv % Hk == 0``.
        feature_map: ``"identity"``, ``"elu+1"``, ``"relu"``, ``"taylor"`` (Based), a
            :class:`~hybridattn.ops.feature_maps.FavorPlusFeatures`, or any callable ``[B, T, H, Dk] ->
            [B, T, H, M]`` (applied to q and k in at least float32).
        normalize: divide by ``phi(q_t) . sum_{j <= t} phi(k_j)`` (Katharopoulos; with FAVOR+ this estimates
            softmax attention). ``scale`` then cancels.
        scale: multiplies ``phi(q)``; default ``Dk ** -0.5`` (of q's own last dim, before the map).
        initial_state: ``[B|N, Hv, M, Dv]`` (``Dv + 1`` columns with ``normalize=True``) or None.
        output_final_state, mode, chunk_size, cu_seqlens: as :func:`~hybridattn.ops.simple_gla.simple_gla`.
        return_attention: parallel mode only: also return ``A [B, Hv, T, T]`` (normalised rows with
            ``normalize=True``).

    Returns:
        ``(o [B, T, Hv, Dv] in q's dtype, final_state [B|N, Hv, M, Dv(+1)] or None)`` (and ``A`` on request).

    Raises:
        TypeError, ValueError: bad tensors or options as :func:`~hybridattn.ops.simple_gla.simple_gla`; an
            unknown feature map name; a feature map whose output is not ``[B, T, H, M]``.
    """
    b, t, hk, dk, hv, dv, n = validate(q, k, v, scale=scale, initial_state=None, mode=mode, chunk_size=chunk_size,
                                       cu_seqlens=cu_seqlens, return_attention=return_attention)
    phi = resolve_feature_map(feature_map)
    ct = compute_dtype(q.dtype)
    fq, fk = _features(phi, q.to(ct), "q"), _features(phi, k.to(ct), "k")
    if fq.shape != fk.shape:
        raise ValueError(f"feature_map: expected the same feature shape for q and k, received {tuple(fq.shape)} "
                         f"and {tuple(fk.shape)}")
    fv = v.to(ct)
    if normalize:  # the running sum of phi(k) rides along as a value column of ones
        fv = torch.cat([fv, torch.ones_like(fv[..., :1])], dim=-1)
    check_initial_state(initial_state, (n, hv, fq.shape[-1], fv.shape[-1]), q)
    out = run(fq.to(ct), fk.to(ct), fv, None, scale=dk ** -0.5 if scale is None else scale,
              initial_state=initial_state, output_final_state=output_final_state, mode=mode, chunk_size=chunk_size,
              cu_seqlens=cu_seqlens, intra_chunk=scalar_decay_weights, pair_weights=scalar_decay_weights,
              return_attention=return_attention)
    o, rest = out[0], list(out[1:])
    if normalize:
        num, den = o[..., :dv], o[..., dv:]
        empty = den == 0
        o = torch.where(empty, 0.0, num / torch.where(empty, 1.0, den))
        if return_attention:
            d = den.squeeze(-1).transpose(1, 2).unsqueeze(-1)  # [B, Hv, T, 1]
            rest[1] = torch.where(d == 0, 0.0, rest[1] / torch.where(d == 0, 1.0, d))
    return (o.to(q.dtype), *rest)
