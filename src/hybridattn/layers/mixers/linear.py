"""Feature-map (kernel) linear attention mixer: Katharopoulos et al. (``elu+1``), Performer (FAVOR+),
Based (``taylor``, the second-order Taylor map; use a small ``linear.head_dim`` such as 16)::

    q, k, v = silu(conv1d([q_proj x | k_proj x | v_proj x]))
    o       = linear_attention(phi(q), phi(k), v, normalize=positive phi)   # S <- S + phi(k) v^T
    y       = o_proj(rmsnorm(o))

Positive maps (``elu+1``, ``taylor``, ``favor``) divide by ``phi(q) . sum phi(k)``; the state then carries that
sum as one extra value column (``[M, Dv + 1]``). The map is applied here, not inside the op, so that a padded
token's ``phi(k)`` can be zeroed (``phi(0)`` is not zero for ``elu+1``).

Shape legend: B batch, T time, Hk key heads, Hv value heads, Dk, Dv head dims, M feature dim.
"""

from __future__ import annotations

import torch

from hybridattn.layers.mixers.base import QKVMixer, linear_config_sizes, zero_padding
from hybridattn.layers.registry import register_mixer
from hybridattn.ops import linear_attention
from hybridattn.ops.feature_maps import FavorPlusFeatures, resolve_feature_map

FEATURE_MAPS = ("identity", "relu", "elu+1", "taylor", "favor")
POSITIVE = ("elu+1", "taylor", "favor")


class LinearAttention(QKVMixer):
    """Kernel linear attention mixer.

    Args:
        d_model: model width.
        feature_map: one of ``FEATURE_MAPS``.
        num_features: M for ``favor`` (default ``2 * Dk``).
        seed: seed of the FAVOR+ projection (the same seed gives the same features after a reload).
        norm_eps: epsilon of the output RMSNorm.
        **sizes: as :class:`~hybridattn.layers.mixers.base.QKVMixer`.
    """

    def __init__(self, d_model: int, *, feature_map: str = "elu+1", num_features: int | None = None, seed: int = 0,
                 norm_eps: float = 1e-6, **sizes):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected one of {FEATURE_MAPS}, received {feature_map!r}")
        dk = sizes["head_k_dim"]
        if feature_map == "favor":
            self_phi = FavorPlusFeatures(dk, num_features or 2 * dk, seed=seed)
            m = self_phi.num_features
        else:
            self_phi = resolve_feature_map(feature_map)
            m = 1 + dk + dk * dk if feature_map == "taylor" else dk
        super().__init__(d_model, norm_eps=norm_eps, **sizes)
        self.feature_map, self.phi = feature_map, self_phi
        self.normalize = feature_map in POSITIVE
        self.state_k_dim, self.state_v_dim = m, self.head_v_dim + int(self.normalize)

    def forward(self, x: torch.Tensor, *, cache=None, token_mask=None) -> torch.Tensor:
        """``[B, T, d_model] -> [B, T, d_model]``; ``cache`` a ``RecurrentCache``, ``token_mask`` ``[B, T]``."""
        token_mask = self._begin(x, cache, token_mask)
        q, k, v = self.qkv(x, cache, token_mask)
        work = torch.promote_types(x.dtype, torch.float32)  # feature maps (exp, squares) need the range
        fq, fk, v = self.phi(q.to(work)), self.phi(k.to(work)), v.to(work)
        fk, v = zero_padding(token_mask, fk, v)
        o = self._mix(linear_attention, fq, fk, v, cache=cache, token_mask=token_mask, feature_map="identity",
                      normalize=self.normalize, scale=self.head_k_dim ** -0.5)
        return self.output(o.to(x.dtype), x, token_mask)

    def extra_repr(self) -> str:
        return f"feature_map={self.feature_map!r}, normalize={self.normalize}"


@register_mixer("linear", options=())  # sized by config.linear, no own options
def build_linear(config, layer_idx: int) -> LinearAttention:
    # A different FAVOR+ draw per layer, reproducible from the layer index.
    return LinearAttention(config.d_model, feature_map=config.linear.feature_map, seed=layer_idx,
                           norm_eps=config.norm_eps, **linear_config_sizes(config))
