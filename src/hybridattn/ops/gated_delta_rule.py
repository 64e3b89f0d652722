"""Gated delta rule (Gated DeltaNet, the linear layer of Qwen3-Next) and, with no gate, the delta rule (DeltaNet).

The recurrence every form implements, per value head, with a state ``S`` of shape ``[Dk, Dv]``::

    S   <- exp(g_t) * S                       # forget (g_t <= 0 is a log-decay; no decay when g is None)
    u_t  = beta_t * (v_t - S^T k_t)           # the delta: what the state mispredicts for k_t, scaled
    S   <- S + k_t u_t^T                      # write the correction
    o_t  = S^T (scale * q_t)

Forms, side by side (all return ``(o, final_state)``):

- ``naive_recurrent_gated_delta_rule``: the plain token loop above, in the inputs' dtype; the reference.
- ``"recurrent"``: token by token with the state kept between calls, the decoding form. One step costs
  ``O(H Dk Dv)`` whatever the number of tokens already consumed.
- ``"parallel"``: the whole sequence as a single chunk of the chunk form; materialises the implicit ``T x T``
  attention matrix and can return it (``return_attention=True``).
- ``"chunk"``: chunkwise-parallel (WY/UT form), in ``_gated_delta_chunk.py``: one pass over chunks of ``C`` tokens,
  each a dozen ``[C, D]``-sized products and one ``C x C`` triangular solve, with a hand-written backward that
  recomputes each chunk from the saved chunk-start states. Training and prefill; memory linear in T.

Every exponent is a difference of cumulative log-decays inside one chunk and is <= 0 (for g <= 0), so nothing
overflows however long the sequence.

Shape legend: B batch, T tokens, Hk query/key heads, Hv value heads (GVA: ``Hv % Hk == 0``, value head ``h``
reads key head ``h // (Hv // Hk)``), Dk key dim, Dv value dim, N packed sequences (``cu_seqlens``), C chunk size.
"""

from __future__ import annotations

import torch

from hybridattn.ops._chunking import exp_flushed
from hybridattn.ops._gated_delta_chunk import attention_matrix, chunk_gated_delta_rule
from hybridattn.ops._checks import check_shape, check_tensor
from hybridattn.ops._gated_linear import MODES, check_log_decay, clamp_log_decay, safe_mode, validate  # noqa: F401 (MODES: this op's forms)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum x^2 + eps)`` over the last dim; the same epsilon as fla and transformers, so
    ``use_qk_l2norm=True`` matches them."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Low-precision inputs accumulate the state in fp32 (as fla does); float64 stays float64 for references.
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------
def naive_recurrent_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm=False
):
    """The recurrence as a plain token loop, in the inputs' dtype (pass float64 for a reference).

    Args:
        q, k: ``[B, T, Hk, Dk]``. v: ``[B, T, Hv, Dv]``. g: ``[B, T, Hv]`` log-decay, or None for no decay.
        beta: ``[B, T, Hv]``. scale: defaults to ``Dk ** -0.5``. initial_state: ``[B, Hv, Dk, Dv]`` or None.
        output_final_state: return the state after the last token. use_qk_l2norm: L2-normalise q and k first.

    Returns:
        ``(o [B, T, Hv, Dv], final_state [B, Hv, Dk, Dv] or None)``.
    """
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    scale = dk**-0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q.repeat_interleave(hv // hk, dim=2)
    k = k.repeat_interleave(hv // hk, dim=2)
    s = q.new_zeros(b, hv, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    gates = [None] * t if g is None else g.to(q.dtype).unbind(1)
    outs = []
    # unbind, not x[:, i]: the backward of T selects would build T full-size zero gradients (quadratic in T).
    for q_t, k_t, v_t, g_t, beta_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), gates, beta.to(q.dtype).unbind(1)):
        if g_t is not None:
            s = s * g_t.exp()[..., None, None]
        pred = torch.einsum("bhk,bhkv->bhv", k_t, s)
        u = beta_t[..., None] * (v_t - pred)
        s = s + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t * scale, s))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(b, 0, hv, dv)
    return o, (s if output_final_state else None)


# --------------------------------------------------------------------------------------------------------------
# Recurrent (decoding) form
# --------------------------------------------------------------------------------------------------------------
def _recurrent(q, k, v, g, beta, scale, h0):
    """Token loop on token-major tensors: q, k ``[B, T, Hk, Dk]``; v ``[B, T, Hv, Dv]``; g, beta ``[B, T, Hv]``.
    Returns ``(o [B, T, Hv, Dv], state [B, Hv, Dk, Dv])``.

    GVA without copying q/k: the state is viewed ``[B, Hk, Hv/Hk, Dk, Dv]`` so one key head meets its group of
    value heads by broadcasting.
    """
    b, t, hk, dk = k.shape
    hv, dv = v.shape[2], v.shape[3]
    grp = hv // hk
    s = q.new_zeros(b, hk, grp, dk, dv) if h0 is None else h0.reshape(b, hk, grp, dk, dv)
    v, beta = v.reshape(b, t, hk, grp, 1, dv), beta.reshape(b, t, hk, grp, 1, 1)
    decay = None if g is None else exp_flushed(g.reshape(b, t, hk, grp, 1, 1))
    q, k = (q * scale).reshape(b, t, hk, 1, 1, dk), k.reshape(b, t, hk, 1, 1, dk)
    outs = []
    decays = [None] * t if decay is None else decay.unbind(1)
    for q_t, k_t, v_t, decay_t, beta_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), decays, beta.unbind(1)):
        if decay_t is not None:
            s = s * decay_t
        u = beta_t * (v_t - k_t @ s)  # (B, Hk, G, 1, Dv)
        s = s + k_t.transpose(-1, -2) * u
        outs.append(q_t @ s)
    o = torch.stack(outs, 1) if outs else v.new_zeros(b, 0, hk, grp, 1, dv)
    return o.reshape(b, t, hv, dv), s.reshape(b, hv, dk, dv)


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------
def _validate(q, k, v, g, beta, *, scale, initial_state, mode, chunk_size, cu_seqlens, return_attention):
    """Check every argument with the linear family's one validation; returns the number of sequences (B, or N
    when packed)."""
    b, t, _, _, hv, _, n = validate(q, k, v, scale=scale, initial_state=initial_state, mode=mode,
                                    chunk_size=chunk_size, cu_seqlens=cu_seqlens, return_attention=return_attention,
                                    packed_attention=True)
    # g and beta may be in another floating dtype (models compute gates in fp32 beside bf16 activations).
    if g is not None:
        check_log_decay("g", g, q, (b, t, hv))
    check_tensor("beta", beta, ndim=3)
    check_shape("beta", beta, (b, t, hv))
    if beta.device != q.device:
        raise ValueError(f"beta: expected device {q.device} (the device of q), received {beta.device}")
    return n


def _pack_index(cu_seqlens: torch.Tensor, device):
    """(sequence id, position in sequence) of every packed token, and the longest length."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    pos = torch.arange(int(cu[-1]), device=device) - cu[seq]
    return seq, pos, lengths.numel(), int(lengths.max())


def _unpack(x: torch.Tensor, index) -> torch.Tensor:
    """``[1, T, ...]`` packed -> ``[N, T_max, ...]``, zero-padded at the end of each sequence. Trailing zeros
    (k = 0, beta = 0, g = 0) leave the state unchanged, so every form runs the padded batch as is."""
    seq, pos, n, t_max = index
    out = x.new_zeros(n, t_max, *x.shape[2:])
    return out.index_put((seq, pos), x[0])


def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm=False,
    mode="chunk",
    chunk_size=64,
    cu_seqlens=None,
    return_attention=False,
):
    """Gated delta rule (Gated DeltaNet): ``S <- exp(g_t) S; u_t = beta_t (v_t - S^T k_t); S <- S + k_t u_t^T;
    o_t = S^T (scale q_t)``. Signature as fla's ``chunk_gated_delta_rule``.

    Args:
        q, k: ``[B, T, Hk, Dk]``.
        v: ``[B, T, Hv, Dv]``, ``Hv % Hk == 0`` (GVA: value head ``h`` reads key head ``h // (Hv // Hk)``).
        g: ``[B, T, Hv]`` log-decay per token and value head (<= 0; ``-inf`` resets the state), or None for no
            decay (delta rule).
        beta: ``[B, T, Hv]`` write strength, normally in (0, 1).
        scale: query scale; default ``Dk ** -0.5``.
        initial_state: ``[B, Hv, Dk, Dv]`` (``[N, Hv, Dk, Dv]`` with ``cu_seqlens``), or None for zeros.
        output_final_state: also return the state after the last token (per sequence with ``cu_seqlens``).
        use_qk_l2norm: L2-normalise q and k over Dk inside the op (eps 1e-6, as fla and transformers).
        mode: ``"chunk"`` (training, prefill), ``"parallel"`` (quadratic, can return the attention matrix) or
            ``"recurrent"`` (token loop; decoding).
        chunk_size: tokens per chunk in ``"chunk"`` mode (16-128 is sensible; 64 by default).
        cu_seqlens: ``[N + 1]`` int offsets of N sequences packed along T (flash-attn/fla varlen); needs B == 1.
        return_attention: ``"parallel"`` only: also return the implicit attention matrix ``[B, Hv, T, T]``, with
            ``o = attention @ v`` plus the initial state's read (block-diagonal over packed sequences).

    Returns:
        ``(o, final_state)``: o ``[B, T, Hv, Dv]`` in q's dtype; final_state ``[B|N, Hv, Dk, Dv]`` in float32
        (float64 for float64 inputs), or None unless ``output_final_state``. With ``return_attention`` a third
        item, the attention matrix.

    Raises:
        TypeError: a non-tensor or non-floating input, k/v dtype unlike q's, a non-int chunk_size.
        ValueError: mismatched shapes or devices, ``Hv % Hk != 0``, an unknown mode, a bad ``cu_seqlens``,
            ``return_attention`` outside parallel mode, a log-decay ``g > 0`` or NaN, a non-finite ``scale``.

    A non-finite q, k, v, beta or initial state runs the token loop whatever ``mode`` says: the other forms would
    carry a NaN at token t into outputs before t (``_gated_linear.safe_mode``).
    """
    _validate(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, mode=mode, chunk_size=chunk_size,
        cu_seqlens=cu_seqlens, return_attention=return_attention,
    )
    dk = q.shape[3]
    out_dtype, cdt = q.dtype, _compute_dtype(q.dtype)
    scale = dk**-0.5 if scale is None else float(scale)
    q, k, v, beta = q.to(cdt), k.to(cdt), v.to(cdt), beta.to(cdt)
    g = None if g is None else clamp_log_decay(g.to(cdt))
    h0 = None if initial_state is None else initial_state.to(cdt)
    mode = "parallel" if return_attention else safe_mode(mode, q, k, v, beta, h0)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    index = None
    if cu_seqlens is not None:
        index = _pack_index(cu_seqlens, q.device)
        q, k, v, beta = (_unpack(x, index) for x in (q, k, v, beta))
        g = None if g is None else _unpack(g, index)
    attention = None
    if mode == "recurrent":
        o, final = _recurrent(q, k, v, g, beta, scale, h0)
    else:
        size = max(q.shape[1], 1) if mode == "parallel" else chunk_size
        o, final = chunk_gated_delta_rule(q, k, v, g, beta, h0, scale, size)
        if return_attention:
            attention = attention_matrix(q, k, g, beta, scale)
    if index is not None:
        seq, pos = index[:2]
        o = o[seq, pos][None]
        if attention is not None:
            attention = _pack_attention(attention, cu_seqlens)
    o = o.to(out_dtype).contiguous()
    final = final if output_final_state else None
    return (o, final, attention) if return_attention else (o, final)


def _pack_attention(attention: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[N, H, T_max, T_max]`` per-sequence matrices -> block-diagonal ``[1, H, T, T]`` over the packed tokens."""
    bounds = cu_seqlens.tolist()
    t = bounds[-1]
    out = attention.new_zeros(1, attention.shape[1], t, t)
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        out[0, :, s:e, s:e] = attention[i, :, : e - s, : e - s]
    return out
