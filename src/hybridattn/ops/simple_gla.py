"""Simple gated linear attention: one scalar log-decay per head and token (Mamba2/SSD-style data-dependent decay),
and RetNet's retention (a constant decay per head).

The recurrence every form implements, per value head with a state ``S [Dk, Dv]``::

    S_t = exp(g_t) S_{t-1} + k_t v_t^T          # g_t <= 0 a scalar log-decay
    o_t = S_t^T (scale q_t)

Forms, side by side (``mode=``), all returning ``(o, final_state)``:

- ``"recurrent"``: the loop above, token by token; the reference, and the decoding form (one step costs
  ``O(H Dk Dv)`` however many tokens came before).
- ``"parallel"``: ``O = (scale Q K^T * L) V`` with ``L[i, j] = exp(G_i - G_j)`` for ``j <= i`` (``G`` the
  cumulative log-decay); materialises the ``T x T`` matrix and returns it on request (``return_attention=True``).
- ``"chunk"``: chunkwise-parallel. Inside a chunk the parallel form with chunk-local ``G``; between chunks the
  state ``S_next = exp(G_C) S + sum_j exp(G_C - G_j) k_j v_j^T``. A scalar decay makes ``L`` a ``C x C`` matrix
  per chunk and head, cheaper than :func:`~hybridattn.ops.gla.gla`'s per-channel weights.

Shape legend: B batch, T tokens, Hk query/key heads, Hv value heads (GVA: ``Hv % Hk == 0``, value head ``h``
reads key head ``h // (Hv // Hk)``), Dk key dim, Dv value dim, N packed sequences (``cu_seqlens``).
"""

from __future__ import annotations

import torch

from hybridattn.ops._gated_linear import compute_dtype, gated_op, validate


def causal_decay(G: torch.Tensor | None, t: int, *, dtype, device) -> torch.Tensor:
    """``L [.., T, T]``: ``exp(G_i - G_j)`` for ``j <= i`` and 0 above the diagonal (``G [.., T, 1]``, may be
    float64); the plain lower-triangular ones when ``G`` is None."""
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    if G is None:
        return causal.to(dtype)
    # mask before exp: above the diagonal the difference is >= 0 and may overflow
    return (G - G.transpose(-1, -2)).masked_fill(~causal, float("-inf")).exp().to(dtype)


def scalar_decay_weights(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor | None) -> torch.Tensor:
    """``A = (Q K^T) * L``: the causal weights for a scalar (or no) decay, over a chunk or a whole sequence."""
    A = q @ k.transpose(-1, -2)
    if G is None:
        return A.tril()
    return A * causal_decay(G, q.shape[-2], dtype=A.dtype, device=A.device)


def simple_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, mode="chunk",
               chunk_size=64, cu_seqlens=None, return_attention=False):
    """Gated linear attention with a scalar log-decay per head and token (fla's ``chunk_simple_gla``).

    ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``.

    Args:
        q, k: ``[B, T, Hk, Dk]``.
        v: ``[B, T, Hv, Dv]`` with ``Hv % Hk == 0`` (more value heads than key heads, as Mamba2's groups).
        g: ``[B, T, Hv]`` log-decays ``<= 0`` (``-inf`` allowed: forget everything).
        scale: multiplies q; default ``Dk ** -0.5``.
        initial_state: ``[B|N, Hv, Dk, Dv]`` or None (zeros).
        output_final_state: return the state after the last token (else None).
        mode: ``"chunk"`` (training, prefill), ``"recurrent"`` (decoding), ``"parallel"`` (the T x T form).
        chunk_size: tokens per chunk in chunk mode (16-128 are sensible; any positive int works).
        cu_seqlens: int ``[N + 1]`` offsets of packed sequences (flash-attn style; B must be 1); each sequence
            starts from its own row of ``initial_state`` and gets its own final state.
        return_attention: parallel mode only: also return ``A [B, Hv, T, T]``, the implicit attention matrix
            (``o = A v`` when there is no initial state).

    Returns:
        ``(o [B, T, Hv, Dv] in q's dtype, final_state [B|N, Hv, Dk, Dv] or None)``; with
        ``return_attention=True`` a third entry ``A``. States are kept in at least float32.

    Raises:
        TypeError, ValueError: a tensor of the wrong type, rank, shape, dtype or device; a gate ``> 0`` or NaN;
            an unknown mode; cu_seqlens with ``B != 1``; return_attention outside parallel mode.
    """
    return gated_op(q, k, v, g, gate_name="g", per_channel=False, intra_chunk=scalar_decay_weights,
                    pair_weights=scalar_decay_weights, scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state, mode=mode, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                    return_attention=return_attention)


def retention_log_decays(num_heads: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """RetNet's per-head log-decays ``log(1 - 2^(-5 - h))``, ``h = 0..H-1``, shape ``[H]``."""
    heads = torch.arange(num_heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -5.0 - heads)).to(device=device, dtype=dtype)


def retention(q, k, v, *, scale=None, initial_state=None, output_final_state=False, mode="chunk", chunk_size=64,
              cu_seqlens=None, return_attention=False):
    """RetNet retention: :func:`simple_gla` with the constant per-head decay ``gamma_h = 1 - 2^(-5 - h)``.

    ``S_t = gamma_h S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)`` (RetNet's group norm and gating belong
    to the layer, not to the op).

    Args:
        q, k: ``[B, T, Hk, Dk]``. v: ``[B, T, Hv, Dv]`` (``Hv % Hk == 0``; the decays follow the value heads).
        scale, initial_state, output_final_state, mode, chunk_size, cu_seqlens, return_attention: as
            :func:`simple_gla`.

    Returns:
        As :func:`simple_gla`.

    Raises:
        TypeError, ValueError: as :func:`simple_gla`.
    """
    # q, k, v first: the decays below are shaped from v, and a wrong q must not surface as an error about them
    b, t, *_ = validate(q, k, v, scale=scale, initial_state=initial_state, mode=mode, chunk_size=chunk_size,
                        cu_seqlens=cu_seqlens, return_attention=return_attention)
    # the decays stay in the compute dtype: 1 - 2^-5 is not representable in bf16
    g = retention_log_decays(v.shape[2], device=v.device, dtype=compute_dtype(v.dtype))
    return simple_gla(q, k, v, g.expand(b, t, -1), scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, mode=mode, chunk_size=chunk_size,
                      cu_seqlens=cu_seqlens, return_attention=return_attention)

