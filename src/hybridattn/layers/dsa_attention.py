"""DeepSeek Sparse Attention mixer (DeepSeek-V3.2): a lightning indexer picks ``top_k`` past keys per query and
softmax runs over those only; its cache keeps the indexer keys beside the attention keys and values. Follows the
mixer protocol of docs/dev/CONTRACTS.md.

Shape legend: B batch, T tokens of this call, H query heads, Hkv key-value heads, D head dim, Hi / Di indexer
heads / head dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridattn.layers.cache import Cache, KVCache, token_positions
from hybridattn.layers.short_conv import check_left_padding
from hybridattn.ops._checks import check_heads_divisible, check_positive_int, check_tensor
from hybridattn.ops.dsa_attention import dsa_attention
from hybridattn.ops.positions import apply_rotary

__all__ = ["DSAAttention", "DSACache", "check_mixer_input"]


class DSACache(Cache):
    """Keys / values of the attention (``kv``) and the indexer keys (``index``, one head of ``Di``)."""

    def __init__(self, batch_size, num_kv_heads, head_dim, index_dim, *, device=None, dtype=torch.float32):
        super().__init__()
        self.kv = KVCache(batch_size, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.index = KVCache(batch_size, 1, index_dim, device=device, dtype=dtype)

    @property
    def real_tokens(self):
        return self.kv.real_tokens

    def tensors(self):
        # the index cache stores its keys twice (as k and v); count them once, as a dedicated buffer would
        return self.kv.tensors() + [self.index.k]

    def update(self, k, v, index_k, token_mask):
        k_all, v_all, key_valid = self.kv.update(k, v, token_mask)
        index_all, _, _ = self.index.update(index_k[:, :, None], index_k[:, :, None], token_mask)
        self.seen_tokens = self.kv.seen_tokens
        return k_all, v_all, index_all[:, :, 0], key_valid


class DSAAttention(nn.Module):
    """DeepSeek Sparse Attention mixer: RoPE'd q / k / v heads, a lightning indexer (``index_heads`` ReLU heads
    of ``index_dim``, weighted per query) choosing ``top_k`` past keys per query, softmax over those.

    The indexer gets no gradient through the top-k choice (see :func:`hybridattn.ops.dsa_attention`); train it
    with an auxiliary loss, or leave it at its initialisation.
    """

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None, head_dim: int | None = None,
                 top_k: int = 64, index_heads: int = 4, index_dim: int = 32, rope_theta: float = 10000.0,
                 bias: bool = False):
        super().__init__()
        self.d_model, self.n_heads = check_positive_int("d_model", d_model), check_positive_int("n_heads", n_heads)
        self.n_kv_heads = n_heads if n_kv_heads is None else check_positive_int("n_kv_heads", n_kv_heads)
        check_heads_divisible("n_heads", n_heads, "n_kv_heads", self.n_kv_heads)
        self.head_dim = check_positive_int("head_dim", head_dim or d_model // n_heads)
        self.top_k = check_positive_int("top_k", top_k)
        self.index_heads = check_positive_int("index_heads", index_heads)
        self.index_dim = check_positive_int("index_dim", index_dim)
        self.rope_theta = rope_theta
        hd = self.head_dim
        self.q_proj = nn.Linear(d_model, n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(n_heads * hd, d_model, bias=bias)
        self.index_q_proj = nn.Linear(d_model, index_heads * index_dim, bias=False)
        self.index_k_proj = nn.Linear(d_model, index_dim, bias=False)
        self.index_w_proj = nn.Linear(d_model, index_heads, bias=False)

    def new_cache(self, batch_size: int, *, device=None, dtype=None) -> DSACache:
        device = self.k_proj.weight.device if device is None else device
        dtype = self.k_proj.weight.dtype if dtype is None else dtype
        return DSACache(batch_size, self.n_kv_heads, self.head_dim, self.index_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, *, cache: DSACache | None = None, token_mask=None) -> torch.Tensor:
        """``[B, T, d_model] -> [B, T, d_model]``; ``token_mask`` ``[B, T]`` (False = left padding)."""
        b, t = check_mixer_input(x, self.d_model)
        token_mask = check_left_padding(token_mask, b, t, x.device)
        if cache is not None and not isinstance(cache, DSACache):
            raise TypeError(f"cache: expected the DSACache from new_cache(), received {type(cache).__name__}")
        hd = self.head_dim
        q = self.q_proj(x).view(b, t, self.n_heads, hd)  # (B, T, H, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, hd)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, hd)
        pos = token_positions(token_mask, t, start=None if cache is None else cache.real_tokens, device=x.device)
        q, k = apply_rotary(q, pos, theta=self.rope_theta), apply_rotary(k, pos, theta=self.rope_theta)
        index_q = self.index_q_proj(x).view(b, t, self.index_heads, self.index_dim)  # (B, T, Hi, Di)
        index_k = self.index_k_proj(x)  # (B, T, Di)
        # DeepSeek-V3.2 scales the per-head weights by Hi^-1/2 (and the scores by Di^-1/2)
        weights = self.index_w_proj(x) / math.sqrt(self.index_heads * self.index_dim)
        key_valid = token_mask
        if cache is not None:
            k, v, index_k, key_valid = cache.update(k, v, index_k, token_mask)
        o = dsa_attention(q, k, v, index_q, index_k, top_k=self.top_k, causal=True, index_weights=weights,
                          key_mask=key_valid)
        y = self.o_proj(o.reshape(b, t, self.n_heads * hd))
        return y if token_mask is None else y * token_mask.unsqueeze(-1).to(y.dtype)


def check_mixer_input(x, d_model: int) -> tuple[int, int]:
    """``(B, T)`` of a mixer input ``x [B, T, d_model]``; raises TypeError / ValueError naming ``x`` otherwise."""
    check_tensor("x", x, ndim=3)
    if x.shape[-1] != d_model:
        raise ValueError(f"x: expected [B, T, d_model={d_model}], received {tuple(x.shape)}")
    return x.shape[0], x.shape[1]
