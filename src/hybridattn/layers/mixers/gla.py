"""Gated linear attention mixer (Yang et al., 2024; fla's ``GatedLinearAttention`` layer)::

    q, k, v = silu(conv1d([q_proj x | k_proj x | v_proj x]))
    gk      = logsigmoid(gk_proj x) / 16      # per key channel log-decay, low-rank projection d -> r -> Hv*Dk
    o       = gla(q, k, v, gk)                # S <- diag(exp(gk)) S + k v^T
    y       = o_proj(rmsnorm(o) * silu(g_proj x))

The ``/ 16`` (fla's ``gate_logit_normalizer``) keeps the initial decays close to 1 (long memory).

Shape legend: B batch, T time, Hk key heads, Hv value heads, Dk, Dv head dims, r gate rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridattn.layers.mixers.base import QKVMixer, linear_config_sizes, zero_padding
from hybridattn.layers.registry import register_mixer
from hybridattn.ops import gla

GATE_LOGIT_NORMALIZER = 16.0


class GatedLinearAttention(QKVMixer):
    """GLA mixer; arguments as :class:`~hybridattn.layers.mixers.base.QKVMixer` plus ``gate_low_rank``."""

    def __init__(self, d_model: int, *, gate_low_rank: int = 16, **kwargs):
        super().__init__(d_model, output_gate=True, **kwargs)
        self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank, bias=False),
                                     nn.Linear(gate_low_rank, self.num_v_heads * self.head_k_dim, bias=True))

    def forward(self, x: torch.Tensor, *, cache=None, token_mask=None) -> torch.Tensor:
        """``[B, T, d_model] -> [B, T, d_model]``; ``cache`` a ``RecurrentCache``, ``token_mask`` ``[B, T]``."""
        token_mask = self._begin(x, cache, token_mask)
        b, t, _ = x.shape
        q, k, v = self.qkv(x, cache, token_mask)
        gk = F.logsigmoid(self.gk_proj(x).float()) / GATE_LOGIT_NORMALIZER
        k, v, gk = zero_padding(token_mask, k, v, gk.view(b, t, self.num_v_heads, self.head_k_dim))
        o = self._mix(gla, q, k, v, gk, cache=cache, token_mask=token_mask)
        return self.output(o, x, token_mask)


@register_mixer("gla", options=())  # sized by config.linear, no own options
def build_gla(config, layer_idx: int) -> GatedLinearAttention:
    return GatedLinearAttention(config.d_model, gate_low_rank=config.linear.gate_low_rank, norm_eps=config.norm_eps,
                                **linear_config_sizes(config))
