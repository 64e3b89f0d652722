"""Mamba2 mixer (Dao & Gu, 2024), its SSD recurrence run through ``simple_gla``::

    z, xBC, dt = split(in_proj x)                   # z, x: [B, T, H*P]; B, C: [B, T, G*N]; dt: [B, T, H]
    x, B, C    = split(silu(conv1d(xBC)))
    dt         = softplus(dt + dt_bias)             # input-dependent step, [B, T, H]
    h_t        = exp(-exp(A_log) dt_t) h_{t-1} + dt_t B_t x_t^T       # state [N, P] per head
    y_t        = C_t^T h_t + D x_t
    out        = out_proj(rmsnorm(y * silu(z)))     # Mamba2's gated norm: gate first, then normalise (per group)

which is ``simple_gla(q=C, k=dt*B, v=x, g=-exp(A_log)*dt, scale=1)`` with the G groups of B/C shared by
H/G heads. Parameter names follow transformers' ``Mamba2Mixer``.

Shape legend: B batch, T time, H heads, P head dim, G groups, N state size.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridattn.layers.mixers.base import LinearMixer, dt_bias_, log_uniform_, zero_padding
from hybridattn.layers.norms import rms_norm
from hybridattn.layers.registry import register_mixer
from hybridattn.layers.short_conv import ShortConvolution
from hybridattn.ops import simple_gla
from hybridattn.ops._checks import check_heads_divisible, check_positive_int


class Mamba2(LinearMixer):
    """Mamba2 mixer.

    Args:
        d_model: model width.
        num_heads: H.
        head_dim: P (``d_inner = H * P``).
        state_size: N.
        n_groups: G, groups of B/C (``H % G == 0``).
        conv_size: short-conv kernel over x, B, C (0 = SiLU only).
        chunk_size: chunk length of the prefill form.
        norm_eps: epsilon of the gated RMSNorm.
    """

    def __init__(self, d_model: int, *, num_heads: int, head_dim: int, state_size: int, n_groups: int = 1,
                 conv_size: int = 4, chunk_size: int = 64, norm_eps: float = 1e-6):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.state_size = check_positive_int("state_size", state_size)
        self.n_groups = check_positive_int("n_groups", n_groups)
        check_heads_divisible("num_heads", num_heads, "n_groups", n_groups)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.norm_eps = norm_eps
        self.d_inner = num_heads * head_dim
        self.state_heads, self.state_k_dim, self.state_v_dim = num_heads, state_size, head_dim
        bc = n_groups * state_size
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * bc + num_heads, bias=False)
        self.conv1d = ShortConvolution(self.d_inner + 2 * bc, conv_size) if conv_size else None
        self.dt_bias = nn.Parameter(dt_bias_(torch.empty(num_heads)))  # dt log-uniform in [1e-3, 1e-1]
        self.A_log = nn.Parameter(log_uniform_(torch.empty(num_heads), 1, 16))
        self.D = nn.Parameter(torch.ones(num_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor, *, cache=None, token_mask=None) -> torch.Tensor:
        """``[B, T, d_model] -> [B, T, d_model]``; ``cache`` a ``RecurrentCache``, ``token_mask`` ``[B, T]``."""
        token_mask = self._begin(x, cache, token_mask)
        b, t, _ = x.shape
        h, p, g_, n = self.num_heads, self.head_dim, self.n_groups, self.state_size
        z, xbc, dt = torch.split(self.in_proj(x), [self.d_inner, self.d_inner + 2 * g_ * n, h], dim=-1)
        xs, bm, cm = torch.split(self._short_conv(xbc, cache, token_mask), [self.d_inner, g_ * n, g_ * n], dim=-1)
        xs = xs.view(b, t, h, p)
        work = torch.promote_types(x.dtype, torch.float32)
        dt = F.softplus(dt.to(work) + self.dt_bias.to(work))  # (B, T, H)
        g = -self.A_log.to(work).exp() * dt
        # (B, T, G, N) -> (B, T, H, N): heads of one group share B and C.
        bm, cm = (y.view(b, t, g_, n).repeat_interleave(h // g_, dim=2) for y in (bm, cm))
        k = bm * dt.unsqueeze(-1).to(x.dtype)
        k, g = zero_padding(token_mask, k, g)
        y = self._mix(simple_gla, cm, k, xs, g, cache=cache, token_mask=token_mask, scale=1.0)
        y = y + self.D.to(y.dtype).view(h, 1) * xs  # (B, T, H, P)
        y = y.reshape(b, t, self.d_inner) * F.silu(z)
        y = rms_norm(y.view(b, t, g_, -1), eps=self.norm_eps).reshape(b, t, self.d_inner) * self.norm_weight
        return zero_padding(token_mask, self.out_proj(y))


@register_mixer("mamba2", options=())  # sized by config.linear, no own options
def build_mamba2(config, layer_idx: int) -> Mamba2:
    lin = config.linear
    return Mamba2(config.d_model, num_heads=lin.v_heads(), head_dim=lin.v_dim(config.d_model),
                  state_size=lin.k_dim(config.d_model), n_groups=lin.num_heads, conv_size=lin.conv_size,
                  chunk_size=lin.chunk_size, norm_eps=config.norm_eps)
