"""The chunk form of the gated delta rule, with a hand-written chunked backward (see ``gated_delta_rule.py`` for the
recurrence and the public entry point).

Per chunk of ``C`` tokens, with ``gamma`` the chunk-local cumulative log-decay, ``G = exp(gamma)``,
``e = exp(gamma_C - gamma)``, ``L[i, j] = exp(gamma_i - gamma_j)`` for ``j <= i`` (else 0) and ``S`` the state at
the chunk start::

    A   = strict_lower(diag(beta) K K^T * L)
    P   = scale Q K^T * L                                  (inclusive of the diagonal)
    r   = diag(beta) (V - diag(G) K S)
    N   = (I + A)^-1 r                                     (what the chunk writes: the UT transform, one trsm)
    O   = scale diag(G) Q S + P N
    S'  = G_C S + (diag(e) K)^T N

Why one pass over the chunks, doing all of a chunk's work at once, rather than batching each step over every
chunk: the per-chunk operands (``[B*H, C, D]``, a few hundred KiB) stay in cache between the dozen products and
element-wise steps. Batched over all chunks, each step streams T-sized temporaries through memory, and on a CPU
that made the forward 2x slower at T = 4096.

Why a hand-written backward: autograd through the per-chunk loop records ~20 small ops per chunk and keeps all
their inputs; the backward below walks the chunks in reverse, recomputes each chunk's operands from q, k, v and
the saved chunk-start states (``Dk * Dv / C`` floats per token and head), and needs no other saved activation.
Its formulas are the chain rule through the six lines above; the tests compare every gradient with autograd
through the float64 token loop.

Shape legend: B batch, T tokens, Hk query/key heads, Hv value heads, Dk key dim, Dv value dim, C chunk size,
N chunks, BH = B * Hv.
"""

from __future__ import annotations

import torch

from hybridattn.ops import _native
from hybridattn.ops._chunking import (
    ChunkLayout, batch_major, chunk_states, decay_gradient, exp_flushed, needs_grad, token_major,
)

def solve_unit_lower(a: torch.Tensor, rhs: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """``(I + strict_lower(a))^-1 rhs`` (or ``(I + strict_lower(a))^-T rhs`` with ``transpose``) for ``[N, C, C]``
    systems; ``a``'s diagonal and upper triangle are never read.

    Posed as ``X M^T = rhs^T`` (``left=False``) because then both operands already are in the column-major layout
    LAPACK's ``trsm`` wants: 3-4x faster on a CPU than the row-major call, which copies both first.
    """
    m = a if transpose else a.mT
    return torch.linalg.solve_triangular(m, rhs.mT, upper=not transpose, left=False, unitriangular=True).mT


def chunk_forward(q, k, v, g, beta, h0, scale, chunk_size, *, states=None):
    """The chunk form without autograd (in-place updates). q, k ``[B, T, Hk, Dk]``; v ``[B, T, Hv, Dv]``; g (or
    None), beta ``[B, T, Hv]``; h0 ``[B, Hv, Dk, Dv]`` or None. Writes the state at each chunk start into
    ``states [N, BH, Dk, Dv]`` when given. Returns ``(o [B, T, Hv, Dv], final_state [B, Hv, Dk, Dv])``."""
    ch = ChunkLayout(q, k, v, g, chunk_size)
    betas = ch.gate_chunks(beta)
    dk, dv = k.shape[3], v.shape[3]
    s, out = ch.start(h0, dk, dv)
    for i in range(ch.n):
        lo, hi = ch.bounds(i)
        qc, kc, vc, gexp, kdec, decay = ch(i)
        bt = betas[i, :, : hi - lo]
        if states is not None:
            states[i].copy_(s)
        cc = hi - lo
        a = torch.bmm(kc, kc.mT, out=ch.scratch("a", i, cc, cc)).mul_(decay).mul_(bt)
        p = torch.bmm(qc, kc.mT, out=ch.scratch("p", i, cc, cc)).mul_(decay)  # scale comes with the product below
        ks, qs = torch.bmm(kc, s, out=ch.scratch("ks", i, cc, dv)), torch.bmm(qc, s, out=ch.scratch("qs", i, cc, dv))
        if gexp is None:
            r = torch.sub(vc, ks, out=ch.scratch("r", i, cc, dv)).mul_(bt)
        else:
            r = torch.addcmul(vc, ks, gexp, value=-1, out=ch.scratch("r", i, cc, dv)).mul_(bt)
        new = solve_unit_lower(a, r)
        o = torch.baddbmm(qs if gexp is None else qs.mul_(gexp), p, new, beta=scale, alpha=scale,
                          out=ch.scratch("o", i, cc, dv))
        out[lo:hi].copy_(o.transpose(0, 1))
        if gexp is not None:  # kc may be a view of k itself (one head, one row), so not in place
            s.mul_(gexp[:, -1:])
            kc = torch.mul(kc, kdec, out=ch.scratch("kd", i, cc, dk))
        s.baddbmm_(kc.mT, new)
    return batch_major(out, ch.b), s.reshape(ch.b, ch.hv, dk, dv)


def chunk_backward(q, k, v, g, beta, states, scale, chunk_size, do, ds):
    """Gradients of :func:`chunk_forward` given ``do [B, T, Hv, Dv]`` and ``ds [B, Hv, Dk, Dv]`` (the final
    state's gradient); ``states`` as written by the forward. Returns ``(dq, dk, dv, dg or None, dbeta, dh0)``."""
    ch = ChunkLayout(q, k, v, g, chunk_size)
    betas = ch.gate_chunks(beta)
    hk, dk_, dv_ = k.shape[2], k.shape[3], v.shape[3]
    do_f = token_major(do)
    dq_f, dk_f = (q.new_empty(ch.t, ch.b * hk, dk_) for _ in range(2))
    dv_f = q.new_empty(ch.t, ch.bh, dv_)
    dbeta = torch.zeros_like(betas)
    dgam = torch.zeros_like(betas) if ch.gated else None
    ds = ds.reshape(ch.bh, dk_, dv_).clone()

    def to_key_heads(x):  # GVA: sum the value heads that read one key head
        return x if ch.grp == 1 else x.reshape(-1, ch.grp, *x.shape[1:]).sum(1)

    for i in reversed(range(ch.n)):
        lo, hi = ch.bounds(i)
        qc, kc, vc, gexp, kdec, decay = ch(i)
        bt = betas[i, :, : hi - lo]
        s, doc = states[i], do_f[lo:hi].transpose(0, 1)
        # Recompute the forward's chunk quantities.
        kk, qk = torch.bmm(kc, kc.mT), torch.bmm(qc, kc.mT)
        a, p = kk * decay * bt, qk * decay * scale
        ks, qs = torch.bmm(kc, s), torch.bmm(qc, s)
        vr = vc - ks if gexp is None else torch.addcmul(vc, ks, gexp, value=-1)  # r / beta
        new = solve_unit_lower(a, vr * bt)
        kd = kc if kdec is None else kc * kdec
        # O = scale diag(G) Q S + P N  and  S' = G_C S + Kd^T N.
        dnew = torch.baddbmm(torch.bmm(kd, ds), p.mT, doc)
        dp = torch.bmm(doc, new.mT)  # dO N^T; only its lower triangle reaches P
        dqk = dp * decay
        do_g = doc if gexp is None else doc * gexp
        dq = torch.baddbmm(torch.bmm(dqk, kc), do_g, s.mT, alpha=scale, beta=scale)
        dkd = torch.bmm(new, ds.mT)
        # N = (I + A)^-1 r: dr = (I + A)^-T dN, dA = -strict_lower(dr N^T).
        dr = solve_unit_lower(a, dnew, transpose=True)
        da = torch.bmm(dr, new.mT).tril_(-1).neg_()
        dv_c = dr * bt
        dbeta[i, :, : hi - lo] = (dr * vr).sum(-1, keepdim=True) + (da * kk * decay).sum(-1, keepdim=True)
        dks = -dv_c if gexp is None else dv_c * -gexp  # r = beta (V - G K S)
        # A = beta K K^T * L and P = scale Q K^T * L: d(K K^T) = dA beta L, d(Q K^T) = scale dP L.
        dkk = da * decay * bt
        dk = torch.bmm(dkk + dkk.mT, kc).baddbmm_(dqk.mT, qc, alpha=scale).baddbmm_(dks, s.mT)
        dk = dk.add_(dkd) if kdec is None else dk.addcmul_(dkd, kdec)
        ds_prev = torch.bmm(kc.mT, dks).baddbmm_(qc.mT, do_g, alpha=scale)
        if gexp is not None:
            # d gamma from G (output read and r), e = exp(gamma_C - gamma), G_C, and L[i, j] = exp(gamma_i - gamma_j).
            dgexp = (doc * qs).sum(-1, keepdim=True).mul_(scale) - (dv_c * ks).sum(-1, keepdim=True)
            de = (kc * dkd).sum(-1, keepdim=True) * kdec
            dl = (da * bt * kk + dp * qk * scale) * decay
            dgam[i, :, : hi - lo] = decay_gradient(dgexp, de, dl, ds, s, gexp)
            ds_prev.add_(ds * gexp[:, -1:])
        else:
            ds_prev.add_(ds)
        ds = ds_prev
        dq_f[lo:hi].copy_(to_key_heads(dq).transpose(0, 1))
        dk_f[lo:hi].copy_(to_key_heads(dk).transpose(0, 1))
        dv_f[lo:hi].copy_(dv_c.transpose(0, 1))
    dg = None
    if ch.gated:  # gamma is a chunk-local cumulative sum of g: d g_t = sum_{s >= t in its chunk} d gamma_s
        dg = ch.gate_tokens(dgam.flip(-2).cumsum(-2).flip(-2))
    b = ch.b
    return (batch_major(dq_f, b), batch_major(dk_f, b), batch_major(dv_f, b), dg, ch.gate_tokens(dbeta),
            ds.reshape(b, ch.hv, dk_, dv_))


class ChunkGatedDeltaRule(torch.autograd.Function):
    """The chunk form as one autograd node: :func:`chunk_forward` saves the chunk-start states,
    :func:`chunk_backward` recomputes the rest."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, chunk_size):
        native = native_forward(q, k, v, g, beta, h0, scale, chunk_size, save_states=True)
        if native is not None:
            o, s, states = native
        else:
            states = chunk_states(q, v, chunk_size)
            o, s = chunk_forward(q, k, v, g, beta, h0, scale, chunk_size, states=states)
        ctx.save_for_backward(q, k, v, g, beta, states)
        ctx.scale, ctx.chunk_size, ctx.has_h0 = scale, chunk_size, h0 is not None
        return o, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, ds):
        q, k, v, g, beta, states = ctx.saved_tensors
        grads = native_backward(q, k, v, g, beta, states, ctx.scale, ctx.chunk_size, do, ds)
        if grads is None:
            grads = chunk_backward(q, k, v, g, beta, states, ctx.scale, ctx.chunk_size, do, ds)
        dq, dk, dv, dg, dbeta, dh0 = grads
        return dq, dk, dv, dg, dbeta, (dh0 if ctx.has_h0 else None), None, None


def native_forward(q, k, v, g, beta, h0, scale, chunk_size, *, save_states=False):
    """:func:`chunk_forward` by the compiled CPU kernel (``csrc/gated_delta.cpp``): ``(o, final_state, states)``,
    ``states`` the chunk-start states ``[N, BH, Dk, Dv]`` when ``save_states`` (else empty). With ``beta=None`` it
    is the scalar-decay linear attention of ``_gated_linear_chunk`` instead. None where the kernel cannot run (not
    built, not CPU, not float32/float64): the caller then uses its PyTorch form."""
    ops = _native.native_ops("gated_delta") if _native.usable(q, k, v, g, beta, h0) else None
    if ops is None:
        return None
    q, k, v = (x.contiguous() for x in (q, k, v))
    g, beta = (None if x is None else x.contiguous() for x in (g, beta))
    return tuple(ops.gdn_chunk_fwd(q, k, v, g, beta, h0, float(scale), int(chunk_size), save_states))


def native_backward(q, k, v, g, beta, states, scale, chunk_size, do, ds):
    """:func:`chunk_backward` by the compiled CPU kernel (``csrc/gated_delta_backward.cpp``), or None where it cannot
    run. With ``beta=None`` it is the backward of the scalar-decay linear attention (``_gated_linear_chunk``) and the
    returned dbeta is None."""
    if not _native.usable(q, k, v, g, beta, states, do, ds):
        return None
    ops = _native.native_ops("gated_delta_backward")
    if ops is None:
        return None
    q, k, v, states, do = (x.contiguous() for x in (q, k, v, states, do))
    g, beta = (None if x is None else x.contiguous() for x in (g, beta))
    dq, dk, dv, dg, dbeta, dh0 = ops.gdn_chunk_bwd(q, k, v, g, beta, states, float(scale), int(chunk_size), do, ds)
    b, t, hk, d = k.shape
    if v.shape[2] != hk:  # GVA: the kernel returns dq, dk per value head; each key head gets its group's sum
        dq, dk = (x.view(b, t, hk, -1, d).sum(3) for x in (dq, dk))
    return dq, dk, dv, (dg if g is not None else None), (dbeta if beta is not None else None), dh0


def chunk_gated_delta_rule(q, k, v, g, beta, h0, scale, chunk_size):
    """The chunk form, differentiable: ``(o [B, T, Hv, Dv], final_state [B, Hv, Dk, Dv])``. Inputs as
    :func:`chunk_forward`, in one float dtype."""
    if q.shape[1] == 0:
        s = q.new_zeros(q.shape[0], v.shape[2], k.shape[3], v.shape[3]) if h0 is None else h0
        return v.new_zeros(q.shape[0], 0, v.shape[2], v.shape[3]), s
    if not needs_grad(q, k, v, g, beta, h0):
        native = native_forward(q, k, v, g, beta, h0, scale, chunk_size)
        return chunk_forward(q, k, v, g, beta, h0, scale, chunk_size) if native is None else native[:2]
    return ChunkGatedDeltaRule.apply(q, k, v, g, beta, h0, scale, chunk_size)


def attention_matrix(q, k, g, beta, scale):
    """The implicit ``[B, Hv, T, T]`` attention matrix of one chunk spanning the sequence (the parallel form):
    ``o = attention @ v`` plus the initial state's read, ``attention = P (I + A)^-1 diag(beta)``. q, k
    ``[B, T, Hk, Dk]``; g (or None), beta ``[B, T, Hv]``. Differentiable by autograd."""
    b, t, hk, _ = k.shape
    hv = beta.shape[2]
    q, k = (x.repeat_interleave(hv // hk, 2).transpose(1, 2) for x in (q, k))  # [B, Hv, T, Dk]
    bt = beta.transpose(1, 2).unsqueeze(-1)  # [B, Hv, T, 1]
    decay = torch.ones(t, t, dtype=q.dtype, device=q.device).tril()
    if g is not None:
        gam = g.transpose(1, 2).cumsum(-1).unsqueeze(-1)
        decay = exp_flushed((gam - gam.mT).tril()) * decay
    a = (k @ k.mT) * decay * bt
    p = (q @ k.mT) * decay * scale
    eye = torch.eye(t, dtype=q.dtype, device=q.device).expand(b * hv, t, t)
    t_inv = solve_unit_lower(a.reshape(b * hv, t, t), eye).reshape(b, hv, t, t)
    return p @ (t_inv * bt.mT)
