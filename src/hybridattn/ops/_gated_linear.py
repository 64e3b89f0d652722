"""Machinery shared by the gated-linear-attention family (``linear_attention``, ``simple_gla``, ``retention``,
``gla``): validation, GVA head expansion, packed sequences, and the three forms written once for any decay.

Every mechanism of the family is the recurrence, per value head with a state ``S [Dk, Dv]``::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = S_t^T (scale q_t)

where the log-decay ``g_t`` is per key channel (``gla``, ``[.., Dk]``), one scalar (``simple_gla``, kept here as
``[.., 1]`` so that it broadcasts like a channel vector), or absent (``linear_attention``). The forms differ only in
how the pairwise weights ``A[i, j] = sum_d q_id k_jd exp(G_id - G_jd)`` (``G`` the cumulative log-decay) are
built, so each mechanism hands in that one function (``intra_chunk`` / ``pair_weights``) and everything else is here.
The chunk form of the scalar-decay and no-decay members is the streaming one of ``_gated_linear_chunk`` (with a
hand-written backward); :func:`chunk_form` below serves the per-channel decays of ``gla``.

Internal layout is ``[B, H, T, D]`` in a compute dtype of at least float32 (bf16/fp16 inputs are upcast so that
the state and the cumulative decays keep their precision).

Shape legend: B batch, T tokens, Hk query/key heads, Hv value heads, Dk key dim, Dv value dim, N packed
sequences, C chunk size, Nc chunks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from hybridattn.ops._checks import (
    check_bthd,
    check_choice,
    check_cu_seqlens,
    check_heads_divisible,
    check_number,
    check_positive_int,
    check_same,
    check_shape,
    check_tensor,
)
from hybridattn.ops._chunking import FLUSH_LOG_DECAY
from hybridattn.ops._gated_linear_chunk import chunk_scalar_decay

MODES = ("chunk", "parallel", "recurrent")

# intra_chunk(q, k, G) -> A: q, k, G are [B, H, Nc, C, Dk] (G [.., C, 1] for a scalar decay, None for none);
# A [B, H, Nc, C, C] is the causal (inclusive) weight matrix of each chunk.
IntraChunk = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# pair_weights(q, k, G) -> A: the same over the whole sequence, q, k [B, H, T, Dk], A [B, H, T, T].
PairWeights = IntraChunk


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the forms run in: the input's, promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def validate(q, k, v, *, scale, initial_state, mode, chunk_size, cu_seqlens, return_attention,
             packed_attention=False):
    """Check q/k/v, the options and the initial state; return ``(B, T, Hk, Dk, Hv, Dv, N)`` (N = batch rows
    of the state: B, or the number of packed sequences). The one validation of every linear op (``gla``,
    ``simple_gla``, ``retention``, ``linear_attention``, the delta rules); ``packed_attention``: the op can return
    the attention matrix of packed sequences."""
    b, t, hk, dk = check_bthd("q", q)
    check_bthd("k", k)
    check_shape("k", k, q.shape)
    check_same("k", "q", k, q)
    vb, vt, hv, dv = check_bthd("v", v)
    if (vb, vt) != (b, t):
        raise ValueError(f"v: expected batch and length (B, T) = {(b, t)} as q, received shape {tuple(v.shape)}")
    check_same("v", "q", v, q)
    check_heads_divisible("v", hv, "q", hk)
    check_choice("mode", mode, MODES)
    check_positive_int("chunk_size", chunk_size)
    if scale is not None:
        check_number("scale", scale)
    if return_attention and mode != "parallel":
        raise ValueError(f"return_attention: expected mode='parallel' (the form that builds the T x T matrix), "
                         f"received mode={mode!r}")
    n = b
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, t, batch=b, device=q.device)
        n = cu_seqlens.numel() - 1
        if return_attention and not packed_attention:
            raise ValueError("return_attention: not supported with cu_seqlens (call each sequence on its own)")
    check_initial_state(initial_state, (n, hv, dk, dv), q)
    return b, t, hk, dk, hv, dv, n


def check_initial_state(initial_state, shape, ref: torch.Tensor) -> None:
    """None, or a floating ``[B|N, Hv, Dk, Dv]`` tensor on q's device (any floating dtype: states are often kept
    in float32 beside bf16 activations)."""
    if initial_state is None:
        return
    check_tensor("initial_state", initial_state, ndim=4)
    check_shape("initial_state", initial_state, shape)
    if initial_state.device != ref.device:
        raise ValueError(f"initial_state: expected device {ref.device} (the device of q), "
                         f"received {initial_state.device}")


def check_log_decay(name: str, g: torch.Tensor, ref: torch.Tensor, shape) -> None:
    """Gates are log-decays: finite or -inf, and <= 0 (a decay factor in [0, 1]); the chunk form relies on it."""
    check_tensor(name, g)
    check_shape(name, g, shape)
    if g.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of q), received {g.device}")
    bad = ~(g <= 0)  # NaN compares False, so it is caught too
    if bool(bad.any()):
        raise ValueError(f"{name}: expected log-decays <= 0 (decay factors exp({name}) in [0, 1]), received "
                         f"{g[bad].flatten()[0].item()!r} at index {tuple(bad.nonzero()[0].tolist())}")


def clamp_log_decay(g: torch.Tensor) -> torch.Tensor:
    """Log-decays floored at ``FLUSH_LOG_DECAY``: a gate of ``-inf`` (a hard reset, or a model's decay that
    overflowed) would make the cumulative differences of the chunk and parallel forms ``-inf - -inf = NaN``; at the
    floor the decay factor is already an exact zero (:func:`~hybridattn.ops._chunking.exp_flushed`)."""
    return g.clamp(min=FLUSH_LOG_DECAY)


def safe_mode(mode: str, *tensors) -> str:
    """``"recurrent"`` when some input is not finite, else ``mode``. Why: the chunk and parallel forms multiply the
    zeros of their causal masks into later tokens' keys and values in dense products, and ``0 * nan`` is NaN, so a
    NaN at token t would reach outputs before t; the token loop never reads the future. One summed check per call
    (conservative: a sum that overflows also takes the loop, which is exact anyway)."""
    if mode == "recurrent":
        return mode
    total = sum(x.sum() for x in tensors if x is not None and x.numel())
    return mode if not isinstance(total, torch.Tensor) or bool(torch.isfinite(total)) else "recurrent"


# -- packed sequences -------------------------------------------------------------------------------------------
def _padding_index(cu_seqlens: torch.Tensor, device):
    """Gather index ``[N, Tmax]`` into the packed time axis and the mask of real tokens."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    t_max = int(lengths.max()) if lengths.numel() else 0
    steps = torch.arange(t_max, device=device)
    valid = steps[None, :] < lengths[:, None]
    index = torch.where(valid, cu[:-1, None] + steps[None, :], torch.zeros_like(steps)[None, :])
    return index, valid


def _pad_packed(x: torch.Tensor, index, valid) -> torch.Tensor:
    """``[1, T, ...]`` packed -> ``[N, Tmax, ...]``, zeros past each sequence's end (no key, no value, no decay,
    so the padded steps leave each sequence's final state unchanged)."""
    out = x[0][index]
    return torch.where(valid.view(*valid.shape, *([1] * (x.dim() - 2))), out, torch.zeros((), dtype=x.dtype,
                                                                                           device=x.device))


# -- the forms, [B, H, T, D] ---------------------------------------------------------------------------------------
def recurrent_form(q, k, v, g, scale, h0):
    """Token by token: the recurrence itself (the reference, and the decoding form). ``g`` is ``[B, H, T, Dk|1]``
    or None. Returns ``o [B, H, T, Dv]`` and the final state."""
    b, h, t, dk = q.shape
    s = h0 if h0 is not None else q.new_zeros(b, h, dk, v.shape[-1])
    decay = g.exp() if g is not None else None
    outs = []
    for i in range(t):
        if decay is not None:
            s = decay[:, :, i, :, None] * s
        s = s + k[:, :, i, :, None] * v[:, :, i, None, :]
        outs.append((scale * q[:, :, i, None, :]) @ s)
    o = torch.cat(outs, dim=2) if outs else v.new_zeros(b, h, 0, v.shape[-1])
    return o, s


def _precise_cumsum(g: torch.Tensor) -> torch.Tensor:
    # The parallel form subtracts cumulative sums taken over the whole sequence; in float32 their rounding error
    # grows with T, so accumulate in float64 where the device has it.
    if g.device.type == "mps":
        return g.cumsum(-2)
    return g.double().cumsum(-2)


def parallel_form(q, k, v, g, scale, h0, pair_weights: PairWeights):
    """The quadratic form: materialise ``A [B, H, T, T]`` and return ``(o, final_state, A)``."""
    q = scale * q
    G = _precise_cumsum(g) if g is not None else None
    A = pair_weights(q, k, G)
    o = A @ v
    b, h, t, dk = q.shape
    s = h0 if h0 is not None else q.new_zeros(b, h, dk, v.shape[-1])
    if G is None:
        return o + q @ s, s + k.transpose(-1, -2) @ v, A
    if t == 0:
        return o, s, A
    G_last = G[:, :, -1:, :]
    o = o + (q * G.exp().to(q.dtype)) @ s
    s = G_last.exp().to(q.dtype).transpose(-1, -2) * s + (k * (G_last - G).exp().to(q.dtype)).transpose(-1, -2) @ v
    return o, s, A


def chunk_form(q, k, v, g, scale, h0, chunk_size: int, intra_chunk: IntraChunk):
    """Chunkwise-parallel: every chunk's intra-chunk work in one batch, then the state hand-off chunk by chunk.

    Per chunk, with ``G`` the chunk-local cumulative log-decay and ``S`` the state at the chunk start::

        O      = A V + (scale Q * exp(G)) S                   # A from intra_chunk (scale included)
        S_next = diag(exp(G_C)) S + (K * exp(G_C - G))^T V

    ``G`` restarts at every chunk, so each exponent is a difference inside one chunk (or ``G <= 0`` itself):
    nothing overflows whatever T is. Only the loop over chunks is sequential; each step is one
    ``[C, Dk] @ [Dk, Dv]`` product and an update of the ``[Dk, Dv]`` state.
    """
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    s = h0 if h0 is not None else q.new_zeros(b, h, dk, dv)
    if t == 0:
        return v.new_zeros(b, h, 0, dv), s
    c = min(chunk_size, t)
    nc = -(-t // c)
    pad = nc * c - t
    # zero keys/values/decays past the end change neither the outputs we keep nor the final state; one copy
    # into a contiguous chunk layout, else every matmul below would copy its operands again
    q, k, v = (F.pad(x, (0, 0, 0, pad)).unflatten(2, (nc, c)).contiguous() for x in (q, k, v))  # [B, H, Nc, C, D]
    if g is not None:
        G = F.pad(g, (0, 0, 0, pad)).unflatten(2, (nc, c)).cumsum(-2)  # chunk-local, <= 0
        G_last = G[..., -1:, :]
        q_in = q * (scale * G.exp())
        k_out = k * (G_last - G).exp()
        decay = G_last.squeeze(-2).unsqueeze(-1).exp()  # [B, H, Nc, Dk|1, 1]
    else:
        G, q_in, k_out, decay = None, q * scale, k, None
    ds = k_out.transpose(-1, -2) @ v  # [B, H, Nc, Dk, Dv]: each chunk's own contribution, all at once
    o_intra = (intra_chunk(q, k, G) * scale) @ v
    # unbind, not indexing in the loop: the backward of x[:, :, i] would build a full-size zero tensor per chunk
    # (quadratic in T), while unbind's backward is one stack
    decays = decay.unbind(2) if decay is not None else [None] * nc
    outs = []
    for o_i, q_i, ds_i, decay_i in zip(o_intra.unbind(2), q_in.unbind(2), ds.unbind(2), decays):
        outs.append(torch.baddbmm(o_i.flatten(0, 1), q_i.flatten(0, 1), s.flatten(0, 1)))
        s = (decay_i * s if decay_i is not None else s) + ds_i
    o = torch.stack(outs, dim=1).view(b, h, nc * c, dv)
    return o[:, :, :t], s


# -- the dispatcher ---------------------------------------------------------------------------------------------
def run(q, k, v, g, *, scale, initial_state, output_final_state, mode, chunk_size, cu_seqlens,
        intra_chunk: IntraChunk, pair_weights: PairWeights, return_attention=False):
    """Run one form on validated inputs. ``q, k [B, T, Hk, Dk]``, ``v [B, T, Hv, Dv]``, ``g`` ``[B, T, Hv, Dk|1]``
    or None. Returns ``(o [B, T, Hv, Dv] in the compute dtype, final_state or None[, A [B, Hv, T, T]])``."""
    ct = compute_dtype(q.dtype)
    hk, hv = q.shape[2], v.shape[2]
    if hv != hk:  # GVA: value head h reads key head h // (Hv // Hk)
        q, k = (x.repeat_interleave(hv // hk, dim=2) for x in (q, k))
    if cu_seqlens is not None:
        index, valid = _padding_index(cu_seqlens, q.device)
        q, k, v = (_pad_packed(x, index, valid) for x in (q, k, v))
        g = _pad_packed(g, index, valid) if g is not None else None
    g = clamp_log_decay(g.to(ct)) if g is not None else None
    h0 = initial_state.to(ct) if initial_state is not None else None
    mode = safe_mode(mode, q, k, v, h0)
    attention = None
    if mode == "chunk" and (g is None or g.shape[-1] == 1) and q.shape[1] > 0:
        # scalar or no decay: the streaming form, token-major [B, T, H, D] in and out
        o, s = chunk_scalar_decay(q.to(ct), k.to(ct), v.to(ct), None if g is None else g[..., 0], h0, scale,
                                  min(chunk_size, q.shape[1]))
        if cu_seqlens is not None:
            o = o[valid].unsqueeze(0)
        return o, (s if output_final_state else None)  # chunk mode never returns attention (validated)
    q, k, v = (x.transpose(1, 2).to(ct) for x in (q, k, v))  # [B, H, T, D]
    g = g.transpose(1, 2) if g is not None else None
    if mode == "recurrent":
        o, s = recurrent_form(q, k, v, g, scale, h0)
    elif mode == "chunk":
        o, s = chunk_form(q, k, v, g, scale, h0, chunk_size, intra_chunk)
    else:
        o, s, attention = parallel_form(q, k, v, g, scale, h0, pair_weights)
    o = o.transpose(1, 2).contiguous()  # [B, T, H, Dv]
    if cu_seqlens is not None:
        o = o[valid].unsqueeze(0)
    s = s if output_final_state else None
    return (o, s, attention) if return_attention else (o, s)


def gated_op(q, k, v, g, *, gate_name: str, per_channel: bool, intra_chunk: IntraChunk, pair_weights: PairWeights,
             scale, initial_state, output_final_state, mode, chunk_size, cu_seqlens, return_attention):
    """Validate and run a gated op (``gla``: ``g [B, T, Hv, Dk]``; ``simple_gla``: ``g [B, T, Hv]``); ``o`` comes
    back in q's dtype."""
    b, t, hk, dk, hv, dv, n = validate(q, k, v, scale=scale, initial_state=initial_state, mode=mode,
                                       chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                                       return_attention=return_attention)
    check_log_decay(gate_name, g, q, (b, t, hv, dk) if per_channel else (b, t, hv))
    out = run(q, k, v, g if per_channel else g.unsqueeze(-1), scale=dk ** -0.5 if scale is None else scale,
              initial_state=initial_state, output_final_state=output_final_state, mode=mode, chunk_size=chunk_size,
              cu_seqlens=cu_seqlens, intra_chunk=intra_chunk, pair_weights=pair_weights,
              return_attention=return_attention)
    return (out[0].to(q.dtype), *out[1:])
