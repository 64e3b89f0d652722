"""Gated DeltaNet mixer, laid out as Qwen3-Next's linear-attention layer (``Qwen3NextGatedDeltaNet``).

Per call::

    q, k, v, z = split(in_proj_qkvz(x))      # grouped per key head: [q_h | k_h | v_{h,1..r} | z_{h,1..r}]
    b, a       = split(in_proj_ba(x))        # grouped per key head: [b_{h,1..r} | a_{h,1..r}]
    q, k, v    = silu(conv1d([q | k | v]))   # depthwise causal conv, kernel 4, over the concatenation
    beta       = sigmoid(b)                  # [B, T, Hv]
    g          = -exp(A_log) * softplus(a + dt_bias)          # log-decay, [B, T, Hv]
    o          = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)   # GVA: Hv value heads, Hk key heads
    y          = out_proj(rmsnorm(o) * w * silu(z))

with ``r = Hv / Hk``. Parameter names and tensor layouts are the transformers ones, so a Qwen3-Next
checkpoint maps onto this module by renaming the prefix only.

Shape legend: B batch, T time, Hk key heads, Hv value heads, Dk key head dim, Dv value head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridattn.layers.mixers.base import LinearMixer, dt_bias_, linear_config_sizes, log_uniform_, zero_padding
from hybridattn.layers.norms import GatedRMSNorm
from hybridattn.layers.registry import register_mixer
from hybridattn.layers.short_conv import ShortConvolution
from hybridattn.ops import _native, gated_delta_rule


class GatedDeltaNet(LinearMixer):
    """Gated DeltaNet mixer (Qwen3-Next layout).

    Args:
        d_model: model width.
        num_k_heads: Hk (query/key heads).
        num_v_heads: Hv (value heads), a multiple of Hk.
        head_k_dim: Dk.
        head_v_dim: Dv.
        conv_size: kernel of the short conv over q/k/v (0 = none, SiLU only).
        chunk_size: chunk length of the prefill form.
        norm_eps: epsilon of the gated output RMSNorm.

    Raises:
        ValueError: non-positive sizes or ``Hv % Hk != 0``.
    """

    def __init__(self, d_model: int, *, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                 conv_size: int = 4, chunk_size: int = 64, norm_eps: float = 1e-6):
        super().__init__()
        self._init_sizes(d_model, num_k_heads, num_v_heads, head_k_dim, head_v_dim, chunk_size)
        self.num_k_heads = num_k_heads

        self.in_proj_qkvz = nn.Linear(d_model, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(d_model, 2 * num_v_heads, bias=False)
        conv_dim = 2 * self.key_dim + self.value_dim
        self.conv1d = ShortConvolution(conv_dim, conv_size) if conv_size else None
        # From-scratch init as fla's: A ~ U(0, 16) and dt_bias the inverse softplus of a dt log-uniform in
        # [1e-3, 1e-1], so g = -A * softplus(a + dt_bias) starts small for every head (see dt_bias_).
        self.dt_bias = nn.Parameter(dt_bias_(torch.empty(num_v_heads)))
        self.A_log = nn.Parameter(log_uniform_(torch.empty(num_v_heads), 0, 16))
        self.norm = GatedRMSNorm(head_v_dim, eps=norm_eps)
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def project(self, x: torch.Tensor):
        """Split the fused projections: q, k ``[B, T, Hk, Dk]``; v, z ``[B, T, Hv, Dv]``; b, a ``[B, T, Hv]``."""
        b_, t, _ = x.shape
        hk, r = self.num_k_heads, self.num_v_heads // self.num_k_heads
        dk, dv = self.head_k_dim, self.head_v_dim
        qkvz = self.in_proj_qkvz(x).view(b_, t, hk, 2 * dk + 2 * r * dv)
        q, k, v, z = torch.split(qkvz, [dk, dk, r * dv, r * dv], dim=-1)
        ba = self.in_proj_ba(x).view(b_, t, hk, 2 * r)
        b, a = torch.split(ba, [r, r], dim=-1)
        v, z = (y.reshape(b_, t, self.num_v_heads, dv) for y in (v, z))
        b, a = (y.reshape(b_, t, self.num_v_heads) for y in (b, a))
        return q, k, v, z, b, a

    def gates(self, b: torch.Tensor, a: torch.Tensor):
        """``beta = sigmoid(b)`` and the log-decay ``g = -exp(A_log) softplus(a + dt_bias)`` (in float32 at
        least: exp(A_log) overflows half precision)."""
        work = torch.promote_types(a.dtype, torch.float32)
        g = -self.A_log.to(work).exp() * F.softplus(a.to(work) + self.dt_bias.to(work))
        return torch.sigmoid(b), g

    def forward(self, x: torch.Tensor, *, cache=None, token_mask=None) -> torch.Tensor:
        """Args:
            x: ``[B, T, d_model]``.
            cache: a ``RecurrentCache`` from ``new_cache``; continued and updated in place.
            token_mask: bool ``[B, T]``, False on left padding (leaves the state and conv tail untouched).

        Returns:
            ``[B, T, d_model]`` (zeros at padded positions).
        """
        token_mask = self._begin(x, cache, token_mask)
        b_, t, _ = x.shape
        if t == 1 and token_mask is None and self._can_decode_natively(x, cache):
            return self._decode_native(x, cache)
        q, k, v, z, b, a = self.project(x)
        qkv = torch.cat([q.reshape(b_, t, -1), k.reshape(b_, t, -1), v.reshape(b_, t, -1)], dim=-1)
        qkv = self._short_conv(qkv, cache, token_mask)
        q, k, v = torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(b_, t, self.num_k_heads, self.head_k_dim)
        k = k.reshape(b_, t, self.num_k_heads, self.head_k_dim)
        v = v.reshape(b_, t, self.num_v_heads, self.head_v_dim)
        beta, g = self.gates(b, a)
        k, v, beta, g = zero_padding(token_mask, k, v, beta, g)
        o = self._mix(gated_delta_rule, q, k, v, g, beta, cache=cache, token_mask=token_mask, use_qk_l2norm=True)
        o = self.norm(o, z)  # (B, T, Hv, Dv)
        return zero_padding(token_mask, self.out_proj(o.reshape(b_, t, self.value_dim)))


    def _can_decode_natively(self, x, cache) -> bool:
        """The compiled one-token step (``ops/csrc/gated_delta_decode.cpp``) covers inference with a cache, a
        bias-free SiLU conv and one float dtype throughout (state included)."""
        conv = self.conv1d
        if cache is None or conv is None or conv.bias is not None or conv.activation != "silu":
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        tensors = (x, cache.state, cache.conv_tail, self.in_proj_qkvz.weight, conv.weight, self.A_log,
                   self.norm.weight)
        return _native.usable(*tensors) and _native.native_ops("gated_delta_decode") is not None

    def _decode_native(self, x: torch.Tensor, cache) -> torch.Tensor:
        b_ = x.shape[0]
        qkvz = self.in_proj_qkvz(x).view(b_, self.num_k_heads, -1)
        ba = self.in_proj_ba(x).view(b_, self.num_k_heads, -1)
        state = cache.state if cache.state.is_contiguous() else cache.state.contiguous()
        o, tail = _native.native_ops("gated_delta_decode").gdn_decode_step(
            qkvz, ba, cache.conv_tail.contiguous(), self.conv1d.weight[:, 0].contiguous(), self.A_log,
            self.dt_bias, state, self.norm.weight, self.head_k_dim**-0.5, self.norm.eps)
        cache.conv_tail = tail
        cache.advance(state, 1)  # the kernel updated the state in place; a copy onto itself when contiguous
        return self.out_proj(o).view(b_, 1, -1)


@register_mixer("gated_deltanet", options=())  # sized by config.linear, no own options
def build_gated_deltanet(config, layer_idx: int) -> GatedDeltaNet:
    sizes = linear_config_sizes(config)
    return GatedDeltaNet(config.d_model, num_k_heads=sizes.pop("num_heads"), **sizes, norm_eps=config.norm_eps)
