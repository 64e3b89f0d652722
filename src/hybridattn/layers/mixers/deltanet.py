"""DeltaNet mixer (Yang et al., 2024; fla's ``DeltaNet`` layer without output gate)::

    q, k, v = silu(conv1d([q_proj x | k_proj x | v_proj x]))
    beta    = sigmoid(b_proj x)                               # [B, T, Hv]
    o       = delta_rule(q, k, v, beta, use_qk_l2norm=True)   # S <- S + beta k (v - S^T k)^T
    y       = o_proj(rmsnorm(o))                              # RMSNorm per head

Shape legend: B batch, T time, Hk key heads, Hv value heads, Dk, Dv head dims.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hybridattn.layers.mixers.base import QKVMixer, linear_config_sizes, zero_padding
from hybridattn.layers.registry import register_mixer
from hybridattn.ops import delta_rule


class DeltaNet(QKVMixer):
    """DeltaNet mixer; arguments as :class:`~hybridattn.layers.mixers.base.QKVMixer`."""

    def __init__(self, d_model: int, **kwargs):
        super().__init__(d_model, **kwargs)
        self.b_proj = nn.Linear(d_model, self.num_v_heads, bias=False)

    def forward(self, x: torch.Tensor, *, cache=None, token_mask=None) -> torch.Tensor:
        """``[B, T, d_model] -> [B, T, d_model]``; ``cache`` a ``RecurrentCache``, ``token_mask`` ``[B, T]``."""
        token_mask = self._begin(x, cache, token_mask)
        q, k, v = self.qkv(x, cache, token_mask)
        beta = torch.sigmoid(self.b_proj(x))
        k, v, beta = zero_padding(token_mask, k, v, beta)
        o = self._mix(delta_rule, q, k, v, beta, cache=cache, token_mask=token_mask, use_qk_l2norm=True)
        return self.output(o, x, token_mask)


@register_mixer("deltanet", options=())  # sized by config.linear, no own options
def build_deltanet(config, layer_idx: int) -> DeltaNet:
    return DeltaNet(config.d_model, norm_eps=config.norm_eps, **linear_config_sizes(config))
