"""Multi-scale retention mixer (RetNet, Sun et al., 2023; fla's ``MultiScaleRetention`` layer)::

    q, k, v = silu(conv1d([q_proj x | k_proj x | v_proj x]))
    S_t     = gamma_h S_{t-1} + k_t v_t^T;  o_t = S_t^T q_t / sqrt(Dk)      # gamma_h = 1 - 2^(-5-h)
    y       = o_proj(rmsnorm(o) * silu(g_proj x))

The recurrence is ``retention``; it runs here as ``simple_gla`` with the same per-head log-decays so that a
padded token can carry a zero log-decay: left padding must not decay a row's state.

Shape legend: B batch, T time, Hk key heads, Hv value heads, Dk, Dv head dims.
"""

from __future__ import annotations

import torch

from hybridattn.layers.mixers.base import QKVMixer, linear_config_sizes, zero_padding
from hybridattn.layers.registry import register_mixer
from hybridattn.ops import simple_gla
from hybridattn.ops.simple_gla import retention_log_decays


class MultiScaleRetention(QKVMixer):
    """RetNet mixer; arguments as :class:`~hybridattn.layers.mixers.base.QKVMixer`."""

    def __init__(self, d_model: int, **kwargs):
        super().__init__(d_model, output_gate=True, **kwargs)

    def forward(self, x: torch.Tensor, *, cache=None, token_mask=None) -> torch.Tensor:
        """``[B, T, d_model] -> [B, T, d_model]``; ``cache`` a ``RecurrentCache``, ``token_mask`` ``[B, T]``."""
        token_mask = self._begin(x, cache, token_mask)
        b, t, _ = x.shape
        q, k, v = self.qkv(x, cache, token_mask)
        work = torch.promote_types(x.dtype, torch.float32)  # 1 - 2^-5 is not representable in bf16
        g = retention_log_decays(self.num_v_heads, device=x.device, dtype=work).expand(b, t, -1)
        k, v, g = zero_padding(token_mask, k, v, g)
        o = self._mix(simple_gla, q, k, v, g, cache=cache, token_mask=token_mask)
        return self.output(o, x, token_mask)


@register_mixer("retention", options=())  # sized by config.linear, no own options
def build_retention(config, layer_idx: int) -> MultiScaleRetention:
    return MultiScaleRetention(config.d_model, norm_eps=config.norm_eps, **linear_config_sizes(config))
