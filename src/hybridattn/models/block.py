"""One pre-norm block of a hybrid model (names as in transformers' Qwen3-Next decoder layer)::

    h = x + mixer(input_layernorm(x))              # softmax mixers sit in `self_attn`, linear ones in `linear_attn`
    y = h + mlp(post_attention_layernorm(h))      # SwiGLU / GELU / MoE, from the feed-forward factory

Shape legend: B batch, T time, d model width.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from hybridattn.layers.mlp import build_ffn
from hybridattn.layers.norms import RMSNorm
from hybridattn.layers.registry import build_mixer, is_softmax_mixer


def build_norm(config) -> RMSNorm:
    """The model's RMSNorm: plain (``x/rms * w``) or zero-centred (``x/rms * (1 + w)``), per ``config.norm``."""
    return RMSNorm(config.d_model, eps=config.norm_eps, zero_centered=config.norm == "rms_zero_centred")


class HybridBlock(nn.Module):
    """Pre-norm residual block around the mixer ``config.layer_types[layer_idx]``.

    Args:
        config: a ``ModelConfig``.
        layer_idx: index of the layer (selects its mixer and feed-forward kind).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.softmax = is_softmax_mixer(self.layer_type)
        self.input_layernorm = build_norm(config)
        # Qwen3-Next names the two kinds of mixer differently; following it keeps checkpoint mapping a rename.
        self.mixer_name = "self_attn" if self.softmax else "linear_attn"
        self.add_module(self.mixer_name, build_mixer(self.layer_type, config, layer_idx))
        self.post_attention_layernorm = build_norm(config)
        self.mlp = build_ffn(config.ffn_kind(layer_idx), config, layer_idx)
        # feed-forwards that take the padding mask (MoE: keep padding out of the load-balancing loss) get it
        self._ffn_takes_mask = "token_mask" in inspect.signature(self.mlp.forward).parameters

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    def forward(self, x: torch.Tensor, *, cache=None, token_mask=None) -> torch.Tensor:
        """``[B, T, d] -> [B, T, d]``; ``cache`` is this layer's mixer cache, ``token_mask`` ``[B, T]``."""
        h = x + self.mixer(self.input_layernorm(x), cache=cache, token_mask=token_mask)
        ffn_kwargs = {"token_mask": token_mask} if self._ffn_takes_mask else {}
        return h + self.mlp(self.post_attention_layernorm(h), **ffn_kwargs)
