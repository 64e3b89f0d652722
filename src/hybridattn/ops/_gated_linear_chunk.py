"""The streaming chunk form of the scalar-decay members of the gated-linear family (``simple_gla``, ``retention``,
``linear_attention``), with a hand-written chunked backward. The per-channel ``gla`` keeps the batched form of
``_gated_linear.chunk_form``.

Per chunk of ``C`` tokens, with ``gamma`` the chunk-local cumulative log-decay (zero without decay),
``G = exp(gamma)``, ``e = exp(gamma_C - gamma)``, ``L[i, j] = exp(gamma_i - gamma_j)`` for ``j <= i`` (else 0) and
``S`` the state at the chunk start::

    P   = scale Q K^T * L
    O   = P V + scale diag(G) Q S
    S'  = G_C S + (diag(e) K)^T V

One pass over the chunks does all of a chunk's work while its operands are in cache, as in
``_gated_delta_chunk`` (which explains why); the backward walks the chunks in reverse and recomputes ``P`` from
q, k and the saved chunk-start states.

Shape legend: B batch, T tokens, H heads (GVA already expanded), Dk key dim, Dv value dim, C chunk size,
N chunks, BH = B * H.
"""

from __future__ import annotations

import torch

from hybridattn.ops._chunking import (
    ChunkLayout, batch_major, chunk_states, decay_gradient, needs_grad, token_major,
)
from hybridattn.ops._gated_delta_chunk import native_backward, native_forward


def chunk_forward(q, k, v, g, h0, scale, chunk_size, *, states=None):
    """Without autograd. q, k ``[B, T, H, Dk]``; v ``[B, T, H, Dv]``; g ``[B, T, H]`` or None; h0
    ``[B, H, Dk, Dv]`` or None. Writes each chunk-start state into ``states [N, BH, Dk, Dv]`` when given.
    Returns ``(o [B, T, H, Dv], final_state [B, H, Dk, Dv])``."""
    ch = ChunkLayout(q, k, v, g, chunk_size)
    dk, dv = k.shape[3], v.shape[3]
    s, out = ch.start(h0, dk, dv)
    for i in range(ch.n):
        lo, hi = ch.bounds(i)
        qc, kc, vc, gexp, kdec, decay = ch(i)
        if states is not None:
            states[i].copy_(s)
        p = torch.bmm(qc, kc.mT).mul_(decay)
        qs = torch.bmm(qc, s)
        o = torch.baddbmm(qs if gexp is None else qs.mul_(gexp), p, vc, beta=scale, alpha=scale)
        out[lo:hi].copy_(o.transpose(0, 1))
        if gexp is not None:
            s.mul_(gexp[:, -1:])
            kc = kc * kdec  # not in place: for one head and one row, kc is a view of k itself
        s.baddbmm_(kc.mT, vc)
    return batch_major(out, ch.b), s.reshape(ch.b, ch.hv, dk, dv)


def chunk_backward(q, k, v, g, states, scale, chunk_size, do, ds):
    """Gradients of :func:`chunk_forward` given ``do [B, T, H, Dv]`` and the final state's ``ds [B, H, Dk, Dv]``.
    Returns ``(dq, dk, dv, dg or None, dh0)``."""
    ch = ChunkLayout(q, k, v, g, chunk_size)
    dk_, dv_ = k.shape[3], v.shape[3]
    do_f = token_major(do)
    dq_f, dk_f = (q.new_empty(ch.t, ch.bh, dk_) for _ in range(2))
    dv_f = q.new_empty(ch.t, ch.bh, dv_)
    dgam = q.new_zeros(ch.n, ch.bh, ch.c, 1) if ch.gated else None
    ds = ds.reshape(ch.bh, dk_, dv_).clone()
    for i in reversed(range(ch.n)):
        lo, hi = ch.bounds(i)
        qc, kc, vc, gexp, kdec, decay = ch(i)
        s, doc = states[i], do_f[lo:hi].transpose(0, 1)
        qk = torch.bmm(qc, kc.mT)
        kd = kc if kdec is None else kc * kdec
        do_g = doc if gexp is None else doc * gexp
        # O = scale (QK^T * L) V + scale diag(G) Q S  and  S' = G_C S + Kd^T V
        dp = torch.bmm(doc, vc.mT)  # dO V^T
        dqk = dp * decay
        dvd = torch.bmm(vc, ds.mT)  # d Kd = V dS'^T
        dq = torch.baddbmm(torch.bmm(dqk, kc), do_g, s.mT, alpha=scale, beta=scale)
        dk = torch.bmm(dqk.mT, qc).mul_(scale)
        dk = dk.add_(dvd) if kdec is None else dk.addcmul_(dvd, kdec)
        dv = torch.baddbmm(torch.bmm(kd, ds), (qk * decay).mT, doc, alpha=scale)
        ds_prev = torch.bmm(qc.mT, do_g).mul_(scale)
        if gexp is not None:
            qs = torch.bmm(qc, s)
            de = (kc * dvd).sum(-1, keepdim=True) * kdec
            dgexp = (doc * qs).sum(-1, keepdim=True).mul_(scale)
            dgam[i, :, : hi - lo] = decay_gradient(dgexp, de, dqk * qk * scale, ds, s, gexp)
            ds_prev.add_(ds * gexp[:, -1:])
        else:
            ds_prev.add_(ds)
        ds = ds_prev
        for buf, x in ((dq_f, dq), (dk_f, dk), (dv_f, dv)):
            buf[lo:hi].copy_(x.transpose(0, 1))
    dg = ch.gate_tokens(dgam.flip(-2).cumsum(-2).flip(-2)) if ch.gated else None
    b = ch.b
    return batch_major(dq_f, b), batch_major(dk_f, b), batch_major(dv_f, b), dg, ds.reshape(b, ch.hv, dk_, dv_)


class ChunkScalarDecay(torch.autograd.Function):
    """The streaming chunk form as one autograd node (saves the chunk-start states, recomputes the rest)."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, chunk_size):
        native = native_forward(q, k, v, g, None, h0, scale, chunk_size, save_states=True)
        if native is not None:
            o, s, states = native
        else:
            states = chunk_states(q, v, chunk_size)
            o, s = chunk_forward(q, k, v, g, h0, scale, chunk_size, states=states)
        ctx.save_for_backward(q, k, v, g, states)
        ctx.scale, ctx.chunk_size, ctx.has_h0 = scale, chunk_size, h0 is not None
        return o, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, ds):
        q, k, v, g, states = ctx.saved_tensors
        native = native_backward(q, k, v, g, None, states, ctx.scale, ctx.chunk_size, do, ds)
        if native is None:
            dq, dk, dv, dg, dh0 = chunk_backward(q, k, v, g, states, ctx.scale, ctx.chunk_size, do, ds)
        else:
            dq, dk, dv, dg, _, dh0 = native
        return dq, dk, dv, dg, (dh0 if ctx.has_h0 else None), None, None


def chunk_scalar_decay(q, k, v, g, h0, scale, chunk_size):
    """Differentiable streaming chunk form: ``(o [B, T, H, Dv], final_state [B, H, Dk, Dv])`` from q, k
    ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, g ``[B, T, H]`` (log-decay) or None, h0 ``[B, H, Dk, Dv]`` or None,
    all in one float dtype; ``T >= 1``."""
    if not needs_grad(q, k, v, g, h0):
        native = native_forward(q, k, v, g, None, h0, scale, chunk_size)
        return chunk_forward(q, k, v, g, h0, scale, chunk_size) if native is None else native[:2]
    return ChunkScalarDecay.apply(q, k, v, g, h0, scale, chunk_size)
