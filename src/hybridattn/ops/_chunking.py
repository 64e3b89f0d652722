"""Helpers shared by the streaming chunk forms (``_gated_delta_chunk``, ``_gated_linear_chunk``): the token-major
layout their per-chunk products read, the per-chunk operands, and decay factors that never turn denormal.

Shape legend: B batch, T tokens, H heads (Hk query/key, Hv value), D head dim, C chunk size, N chunks,
BH = B * Hv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: log-decays below this give exactly zero decay factors (``exp(-60)`` ~ 1e-26), see :func:`exp_flushed`
FLUSH_LOG_DECAY = -60.0
_FLUSH_FACTOR = math.exp(FLUSH_LOG_DECAY)


def exp_flushed(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)``, with exact zeros where ``x < FLUSH_LOG_DECAY``. Why: a strongly decaying head (Qwen3-Next's gates
    reach ``g ~ -10`` per token) multiplies ever smaller factors into the state and the chunk matrices until they
    are denormal, and CPU arithmetic on denormals runs 10-100x slower (``exp`` itself too). The terms dropped are
    below 1e-26 of the O(1) ones, beneath float64 resolution."""
    # threshold, not where(x > ...): boolean masks are ~5x slower than one vectorised threshold on a CPU
    return F.threshold(x.clamp(min=FLUSH_LOG_DECAY).exp(), _FLUSH_FACTOR, 0.0)


def token_major(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[T, B*H, D]``: a view when B == 1, one copy otherwise. A chunk of it, transposed, is
    the ``[B*H, C, D]`` batch of matrices every per-chunk product takes."""
    b, t, h, d = x.shape
    return x[0] if b == 1 else x.transpose(0, 1).reshape(t, b * h, d)


def batch_major(x: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of :func:`token_major`: ``[T, B*H, D]`` -> ``[B, T, H, D]`` (a view; non-contiguous when B > 1)."""
    t, bh, d = x.shape
    return x.reshape(t, b, bh // b, d).transpose(0, 1)


def decay_matrix(gam: torch.Tensor, mask: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``L [..., C, C]`` with ``L[i, j] = exp(gam_i - gam_j)`` for ``j <= i`` and 0 above the diagonal, flushed as
    :func:`exp_flushed`, from chunk-local cumulative log-decays ``gam [..., C, 1]`` and the float lower-triangular
    ``mask [C, C]``, written into ``out`` when given. Not differentiable (in-place steps): for the streaming forms and
    their hand-written backward."""
    diff = torch.sub(gam, gam.mT, out=out).tril_()  # tril first: the upper triangle would overflow otherwise
    return F.threshold_(diff.clamp_(min=FLUSH_LOG_DECAY).exp_(), _FLUSH_FACTOR, 0.0).mul_(mask)


class ChunkLayout:
    """The per-chunk operands of one call of a streaming chunk form, recomputed on demand by its forward and its
    backward pass. q, k ``[B, T, Hk, Dk]``; v ``[B, T, Hv, Dv]`` (``Hv % Hk == 0``); g ``[B, T, Hv]`` log-decays or
    None."""

    def __init__(self, q, k, v, g, chunk_size: int):
        b, t, hk, _ = k.shape
        self.b, self.t, self.c, self.hv = b, t, chunk_size, v.shape[2]
        self.grp, self.bh = self.hv // hk, b * self.hv
        self.n = -(-t // chunk_size)
        self.qf, self.kf, self.vf = token_major(q), token_major(k), token_major(v)
        self.gated = g is not None
        if self.gated:
            gam = self.gate_chunks(g).cumsum(-2)  # chunk-local, so every exponent is bounded for any T
            self.gam, self.gexp, self.kdec = gam, exp_flushed(gam), exp_flushed(gam[:, :, -1:] - gam)
            # Mild decays (every cumulative log-decay in [-60, 0], as with g <= 0 and a chunk's total decay above
            # e^-60) allow L[i, j] = G_i / G_j: one product instead of the six steps of decay_matrix, with no
            # overflow and no factor below e^-60.
            self.inv_gexp = 1.0 / self.gexp if bool((gam.amin() >= FLUSH_LOG_DECAY) & (gam.amax() <= 0)) else None
        self.mask = torch.ones(chunk_size, chunk_size, dtype=q.dtype, device=q.device).tril()
        self._scratch: dict[str, torch.Tensor] = {}

    def scratch(self, name: str, i: int, *shape: int) -> torch.Tensor | None:
        """A buffer ``[BH, *shape]`` reused from chunk to chunk for full chunks (None for the short last one, so
        that ``out=None`` allocates). Why: a fresh allocation per chunk costs page faults and cache misses that
        were ~10% of the forward; a buffer must be consumed before the next chunk asks for it again."""
        if self.bounds(i)[1] - self.bounds(i)[0] != self.c:
            return None
        buf = self._scratch.get(name)
        if buf is None:
            buf = self._scratch[name] = self.mask.new_empty(self.bh, *shape)
        return buf

    def start(self, h0, dk: int, dv: int):
        """The running state ``[BH, Dk, Dv]`` (a copy of ``h0 [B, Hv, Dk, Dv]``, or zeros) and the output buffer
        ``[T, BH, Dv]`` a forward pass fills chunk by chunk."""
        s = self.mask.new_zeros(self.bh, dk, dv) if h0 is None else h0.reshape(self.bh, dk, dv).clone()
        return s, self.mask.new_empty(self.t, self.bh, dv)

    def gate_chunks(self, x):
        """``[B, T, Hv]`` -> ``[N, BH, C, 1]``, zero-padded at the end (g = 0 there: gamma_C stays the last real
        token's)."""
        x = torch.nn.functional.pad(x, (0, 0, 0, self.n * self.c - self.t))
        return x.reshape(self.b, self.n, self.c, self.hv).permute(1, 0, 3, 2).reshape(self.n, self.bh, self.c, 1)

    def gate_tokens(self, x):
        """Inverse of :meth:`gate_chunks`: ``[N, BH, C, 1]`` -> ``[B, T, Hv]``."""
        x = x.reshape(self.n, self.b, self.hv, self.c).permute(1, 0, 3, 2).reshape(self.b, self.n * self.c, self.hv)
        return x[:, : self.t]

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.c, min(self.t, (i + 1) * self.c)

    def __call__(self, i: int):
        """Chunk ``i``: ``(qc, kc, vc, G, e, L)``. qc, kc ``[BH, cc, Dk]`` expanded to the value heads, kc
        contiguous (views of q and k are possible: never update them in place); vc ``[BH, cc, Dv]`` a view;
        ``G = exp(gamma)``, ``e = exp(gamma_C - gamma)`` ``[BH, cc, 1]`` (None without a gate); ``L [BH|1, cc, cc]``.
        """
        lo, hi = self.bounds(i)
        cc = hi - lo
        qc, kc = (x[lo:hi].transpose(0, 1) for x in (self.qf, self.kf))
        if self.grp > 1:  # GVA: each key head repeated for its group of value heads
            qc, kc = (self._expand(name, i, x) for name, x in (("q", qc), ("k", kc)))
        else:
            # k is read four times, transposed twice: as a strided view MKL's batched gemm runs ~1.5x slower than
            # the copy costs. q (read twice, never transposed) is faster left a view.
            buf = self.scratch("k", i, cc, kc.shape[-1])
            kc = kc.contiguous() if buf is None else buf.copy_(kc)
        vc = self.vf[lo:hi].transpose(0, 1)
        mask = self.mask[:cc, :cc]
        if not self.gated:
            return qc, kc, vc, None, None, mask
        gm = self.gam[i, :, :cc]
        out = self.scratch("decay", i, cc, cc)
        if self.inv_gexp is None:
            decay = decay_matrix(gm, mask, out=out)
        else:
            gexp = self.gexp[i, :, :cc]
            decay = torch.mul(gexp, self.inv_gexp[i, :, :cc].mT, out=out).mul_(mask)
        return qc, kc, vc, self.gexp[i, :, :cc], self.kdec[i, :, :cc], decay

    def _expand(self, name, i, x):
        """``[B*Hk, cc, D]`` -> ``[BH, cc, D]``, key head ``j`` repeated for value heads ``j*grp .. j*grp+grp-1``."""
        buf = self.scratch(name, i, *x.shape[1:])
        if buf is None:
            return x.repeat_interleave(self.grp, 0)
        buf.view(-1, self.grp, *x.shape[1:]).copy_(x.unsqueeze(1))
        return buf


def decay_gradient(dgexp, de, dl, ds, s, gexp):
    """``d gamma [BH, cc, 1]`` of one chunk for the hand-written backwards, from the gradients reaching
    ``G = exp(gamma)`` (``dgexp``, per row), ``e = exp(gamma_C - gamma)`` (``de``, already times ``e``) and
    ``L[i, j] = exp(gamma_i - gamma_j)`` (``dl = dL * L``), plus ``G_C``'s read of the chunk-start state ``s``
    (``ds`` the gradient of the chunk-end state)."""
    dgm = dgexp * gexp - de + dl.sum(-1, keepdim=True) - dl.sum(-2).unsqueeze(-1)
    dgm[:, -1] += de.sum(-2) + (ds * s).sum((-1, -2)).unsqueeze(-1) * gexp[:, -1]
    return dgm


def chunk_states(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """An empty ``[N, B*Hv, Dk, Dv]`` buffer for the chunk-start states a forward saves for its backward."""
    b, t, _, dk = q.shape
    return q.new_empty(-(-t // chunk_size), b * v.shape[2], dk, v.shape[3])


def needs_grad(*tensors) -> bool:
    """Whether autograd must see this call: grad mode is on and some tensor (None allowed) requires grad."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
