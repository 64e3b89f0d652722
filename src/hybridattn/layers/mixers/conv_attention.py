"""``conv_attention``: softmax attention behind a depthwise causal short convolution, zoology's MQAR baseline.

Zoology (Arora, Eyuboglu et al., 2023) trains its attention baseline on MQAR as a ``Hybrid`` of a short
``BaseConv`` and multi-head attention in every layer; the linear mixers here (Gated DeltaNet, Mamba2, GLA...)
carry the same kind of short conv over their inputs. The conv gives each position its predecessor's token, so
a key-value pair is bound in one layer and attention only has to look the key up; without it an all-softmax
model must first learn a previous-token head (an induction circuit), which on MQAR sits on a long plateau at
loss ~ln K (see docs/benchmarks.md, arena).

The layer computes ``attention(x + conv(x))``; its cache is the attention KV cache plus the conv's
``K - 1``-token tail, so prefill, decoding and cache bytes behave as for ``attention``.

Shape legend: B batch, T time, C = d_model, K conv kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridattn.layers.cache import Cache
from hybridattn.layers.registry import register_mixer
from hybridattn.layers.short_conv import ShortConvolution, check_left_padding


class ConvKVCache(Cache):
    """The cache of a ``conv_attention`` layer: the attention ``kv`` cache and the conv ``tail`` ``[B, K-1, C]``."""

    def __init__(self, kv: Cache, tail: torch.Tensor):
        super().__init__()
        self.kv, self.tail = kv, tail

    @property
    def seen_tokens(self) -> int:
        return self.kv.seen_tokens

    @seen_tokens.setter
    def seen_tokens(self, value) -> None:  # Cache.__init__ sets it; the KV cache owns the count
        pass

    @property
    def real_tokens(self):
        return self.kv.real_tokens

    def tensors(self) -> list[torch.Tensor]:
        return [*self.kv.tensors(), self.tail]

    def reset(self) -> None:
        """Forget every token, keeping the storage: the attention cache's and a zero conv tail."""
        self.kv.reset()
        self.tail.zero_()


class ConvAttention(nn.Module):
    """``attention(x + conv(x))`` with a depthwise causal ``ShortConvolution`` (no activation) of ``kernel_size``.

    Args:
        attention: a :class:`~hybridattn.layers.attention.MultiHeadAttention` (self-attention).
        d_model: C.
        kernel_size: K (zoology's BaseConv uses 3; the linear mixers here use 4).
    """

    def __init__(self, attention: nn.Module, d_model: int, kernel_size: int = 4):
        super().__init__()
        self.conv1d = ShortConvolution(d_model, kernel_size, activation="identity")
        self.attn = attention

    def new_cache(self, batch_size: int, *, device=None, dtype=None) -> ConvKVCache:
        kv = self.attn.new_cache(batch_size, device=device, dtype=dtype)
        return ConvKVCache(kv, self.conv1d.new_tail(batch_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, *, cache: ConvKVCache | None = None, token_mask=None) -> torch.Tensor:
        token_mask = check_left_padding(token_mask, x.shape[0], x.shape[1], x.device)
        y, tail = self.conv1d(x, tail=None if cache is None else cache.tail, token_mask=token_mask)
        if cache is not None:
            cache.tail = tail
        return self.attn(x + y, cache=None if cache is None else cache.kv, token_mask=token_mask)


@register_mixer("conv_attention", softmax=True, options=("conv_size",))
def build_conv_attention(config, layer_idx: int) -> ConvAttention:
    from hybridattn.layers.mixers.attention import build_attention

    kernel = config.mixer_options.get("conv_attention", {}).get("conv_size", config.linear.conv_size or 4)
    return ConvAttention(build_attention(config, layer_idx), config.d_model, kernel)
