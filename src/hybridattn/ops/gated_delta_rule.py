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
- ``"chunk"``: chunkwise-parallel (WY/UT form). All intra-chunk work is batched over every chunk at once; only the
  state hand-off (three ``[C, Dk] x [Dk, Dv]``-sized products per chunk) is sequential. Training and prefill;
  differentiated by autograd (memory linear in T).

Chunk form, per chunk of ``C`` tokens with ``gamma`` the chunk-local cumulative log-decay and ``S0`` the state at
the chunk start (``L[i, j] = exp(gamma_i - gamma_j)`` for ``j <= i``, else 0; ``G = exp(gamma)``)::

    A   = strict_lower(diag(beta) K K^T * L)
    W   = (I + A)^-1 diag(beta G) K,   U = (I + A)^-1 diag(beta) V      (the UT transform)
    P   = scale Q K^T * L                                               (inclusive of the diagonal)
    new = U - W S0                                                      (what the chunk writes)
    O   = scale diag(G) Q S0 + P new
    S1  = G_C S0 + Kd^T new,   Kd = diag(exp(gamma_C - gamma)) K

A, W, U and P are computed for all chunks in batched matmuls; only the last three lines run chunk by chunk.

Every exponent is a difference of cumulative log-decays inside one chunk and is <= 0 (for g <= 0), so nothing
overflows however long the sequence; positive exponents are masked before ``exp``.

Shape legend: B batch, T tokens, Hk query/key heads, Hv value heads (GVA: ``Hv % Hk == 0``, value head ``h``
reads key head ``h // (Hv // Hk)``), Dk key dim, Dv value dim, N packed sequences (``cu_seqlens``), C chunk size.
"""

from __future__ import annotations

import torch

from hybridattn.ops._checks import (
    check_bthd,
    check_choice,
    check_cu_seqlens,
    check_heads_divisible,
    check_positive_int,
    check_shape,
    check_tensor,
)

MODES = ("chunk", "parallel", "recurrent")


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
    decay = None if g is None else g.reshape(b, t, hk, grp, 1, 1).exp()
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
# Chunk and parallel forms
# --------------------------------------------------------------------------------------------------------------
_SOLVE_BLOCK = 16


def solve_unit_lower(a: torch.Tensor, rhs: torch.Tensor, *, block: int = _SOLVE_BLOCK) -> torch.Tensor:
    """``(I + strict_lower(a))^-1 @ rhs`` for a batch of ``[C, C]`` systems (the UT transform); ``a``'s diagonal
    and upper triangle are ignored.

    Blocked forward substitution: ``torch.linalg.solve_triangular`` inverts the ``block x block`` diagonal blocks of
    every system at once, and the ``ceil(C / block)`` block rows are eliminated with batched matmuls. Why not one
    ``solve_triangular`` on the ``C x C`` systems: on CPU it calls a BLAS ``trsm`` per system that opens its own
    thread team, and on a shared 2-core machine hundreds of those barriers made it 10-100x slower than the matmuls
    around it; 16 x 16 solves stay single-threaded and the matmuls are batched over every system.

    Args:
        a: ``[..., C, C]``. rhs: ``[..., C, R]``. block: diagonal block size.

    Returns:
        ``[..., C, R]``.
    """
    c = a.shape[-1]
    nb = -(-c // block)
    pad = nb * block - c
    if pad:  # zero rows/columns extend the system by an identity block, leaving the solution unchanged
        a = torch.nn.functional.pad(a, (0, pad, 0, pad))
        rhs = torch.nn.functional.pad(rhs, (0, 0, 0, pad))
    lead = a.shape[:-2]
    diag = a.reshape(*lead, nb, block, nb, block).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
    eye = torch.eye(block, dtype=a.dtype, device=a.device).expand_as(diag)
    inv = torch.linalg.solve_triangular(diag, eye, upper=False, unitriangular=True)  # (..., nb, block, block)
    rows = []
    for i in range(nb):
        lo, hi = i * block, (i + 1) * block
        r = rhs[..., lo:hi, :]
        if i:
            r = r - a[..., lo:hi, :lo] @ torch.cat(rows, -2) if i > 1 else r - a[..., lo:hi, :lo] @ rows[0]
        rows.append(inv[..., i, :, :] @ r)
    return torch.cat(rows, -2)[..., :c, :] if nb > 1 else rows[0][..., :c, :]


def _chunk(q, k, v, g, beta, scale, h0, chunk_size, *, return_attention=False):
    """Chunkwise-parallel form on token-major tensors, q and k already expanded to the Hv value heads.

    q, k ``[B, T, H, Dk]``; v ``[B, T, H, Dv]``; g (or None), beta ``[B, T, H]``; h0 ``[B, H, Dk, Dv]`` or None.
    Returns ``(o [B, T, H, Dv], final_state [B, H, Dk, Dv], attention [B, H, T, T] or None)``; ``attention`` is
    only built when ``return_attention``, and needs ``chunk_size >= T`` (a single chunk).
    """
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    c = chunk_size
    pad = (-t) % c
    if pad:
        # Padded tokens have k = 0 and beta = 0, so they write nothing; with g = 0 they do not decay the state.
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta = torch.nn.functional.pad(beta, (0, 0, 0, pad))
        g = None if g is None else torch.nn.functional.pad(g, (0, 0, 0, pad))
    n = (t + pad) // c
    if n == 0:
        s = q.new_zeros(b, h, dk, dv) if h0 is None else h0
        return v.new_zeros(b, 0, h, dv), s, (q.new_zeros(b, h, 0, 0) if return_attention else None)

    # Chunks first, (N, B*H, C, D) contiguous: every intra-chunk product is one batched matmul over all chunks,
    # and the sequential loop below reads contiguous per-chunk slices.
    def chunks(x):
        return x.reshape(b, n, c, h, -1).permute(1, 0, 3, 2, 4).reshape(n, b * h, c, x.shape[-1])

    q, k, v = chunks(q), chunks(k), chunks(v)
    beta = chunks(beta[..., None])[..., 0]  # (N, B*H, C)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    if g is None:
        decay = causal.to(q.dtype)  # L is the plain causal mask
        k_w, q_read, kd, last = k * beta[..., None], q * scale, k, None
    else:
        gam = chunks(g[..., None])[..., 0].cumsum(-1)  # chunk-local, so it stays bounded for any T
        decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        gexp = gam.exp()
        k_w, q_read = k * (beta * gexp)[..., None], q * (gexp * scale)[..., None]
        kd = k * (gam[..., -1:] - gam).exp()[..., None]
        last = gexp[..., -1, None, None]  # (N, B*H, 1, 1)
    kt = k.transpose(-1, -2)
    # (I + A)^-1 with A = strict_lower(diag(beta) K K^T * L); the solve reads only the strict lower triangle.
    a = (k @ kt).mul_(decay).mul_(beta[..., :, None])
    t_inv = solve_unit_lower(a, torch.eye(c, dtype=q.dtype, device=q.device).expand_as(a))
    w = t_inv @ k_w  # (N, B*H, C, Dk)
    u = t_inv @ (v * beta[..., None])  # (N, B*H, C, Dv)
    p = (q @ kt).mul_(decay * scale)  # (N, B*H, C, C), causal inclusive
    # The only sequential part, per chunk: the values it writes given the incoming state (u - W S), its output
    # (the state's read plus the intra-chunk attention), and the state hand-off.
    # unbind, not indexing: the backward of N selects would build N full-size zero gradients.
    s = q.new_zeros(b * h, dk, dv) if h0 is None else h0.reshape(b * h, dk, dv)
    outs = []
    lasts = [None] * n if last is None else last.unbind(0)
    for u_i, w_i, p_i, q_i, kd_i, last_i in zip(u.unbind(0), w.unbind(0), p.unbind(0), q_read.unbind(0),
                                               kd.transpose(-1, -2).unbind(0), lasts):
        new = torch.baddbmm(u_i, w_i, s, alpha=-1)
        outs.append(torch.baddbmm(p_i @ new, q_i, s))
        s = torch.baddbmm(s if last_i is None else last_i * s, kd_i, new)
    o = torch.stack(outs).reshape(n, b, h, c, dv).permute(1, 0, 3, 2, 4).reshape(b, n * c, h, dv)[:, :t]
    attention = None
    if return_attention:
        # o = attention @ v (+ the initial state's read): attention = P (I + A)^-1 diag(beta).
        attention = (p @ (t_inv * beta[..., None, :]))[0].reshape(b, h, c, c)[..., :t, :t]
    return o, s.reshape(b, h, dk, dv), attention


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------
def _check_device(name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of q), received {x.device}")


def _validate(q, k, v, g, beta, *, scale, initial_state, mode, chunk_size, cu_seqlens, return_attention):
    """Check every argument; returns the number of sequences (B, or N when packed)."""
    b, t, hk, dk = check_bthd("q", q)
    check_bthd("k", k)
    check_shape("k", k, q.shape)
    vb, vt, hv, dv = check_bthd("v", v)
    if (vb, vt) != (b, t):
        raise ValueError(f"v: expected batch and length ({b}, {t}) like q, received shape {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), received {x.dtype}")
        _check_device(name, x, q)
    check_heads_divisible("v", hv, "q", hk)
    # g and beta may be in another floating dtype (models compute gates in fp32 beside bf16 activations).
    for name, x in (("g", g), ("beta", beta)):
        if x is None and name == "g":
            continue
        check_tensor(name, x, ndim=3)
        check_shape(name, x, (b, t, hv))
        _check_device(name, x, q)
    check_choice("mode", mode, MODES)
    check_positive_int("chunk_size", chunk_size)
    if return_attention and mode != "parallel":
        raise ValueError(f"return_attention: expected mode='parallel' (the form that builds it), received {mode!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale: expected a float or None, received {type(scale).__name__}")
    n = b
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, t, batch=b)
        n = cu_seqlens.numel() - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4)
        check_shape("initial_state", initial_state, (n, hv, dk, dv))
        _check_device("initial_state", initial_state, q)
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
        g: ``[B, T, Hv]`` log-decay per token and value head (normally <= 0), or None for no decay (delta rule).
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
            ``return_attention`` outside parallel mode.
    """
    n = _validate(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, mode=mode, chunk_size=chunk_size,
        cu_seqlens=cu_seqlens, return_attention=return_attention,
    )
    b, t, hk, dk = q.shape
    hv = v.shape[2]
    out_dtype, cdt = q.dtype, _compute_dtype(q.dtype)
    scale = dk**-0.5 if scale is None else float(scale)
    q, k, v, beta = q.to(cdt), k.to(cdt), v.to(cdt), beta.to(cdt)
    g = None if g is None else g.to(cdt)
    h0 = None if initial_state is None else initial_state.to(cdt)
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
        q, k = (x.repeat_interleave(hv // hk, dim=2) for x in (q, k))
        size = max(q.shape[1], 1) if mode == "parallel" else chunk_size
        o, final, attention = _chunk(q, k, v, g, beta, scale, h0, size, return_attention=return_attention)
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
