"""Sparse and approximate softmax mixers: mask patterns on MultiHeadAttention, DeepSeek Sparse Attention,
Linformer and Reformer LSH attention, each following the mixer protocol of docs/dev/CONTRACTS.md.

- :class:`PatternAttention`: ``MultiHeadAttention`` whose scores are restricted by a mask spec (Longformer's
  window + global tokens, BigBird, Sparse Transformer patterns...). Long sequences run on the block-sparse kernel
  through ``softmax_attention``'s ``auto`` backend. Its cache is the growing ``KVCache``: positions in the
  pattern are cache slots, so decoding continues the pattern exactly (a plain sliding window uses
  ``MultiHeadAttention(window=W)`` and its ring buffer of ``W`` slots instead).
- :class:`DSAAttention`: a lightning indexer picks ``top_k`` past keys per query; its cache keeps the indexer
  keys beside the attention keys and values.
- :class:`LinformerAttention` and :class:`LSHAttention`: bidirectional / whole-sequence mechanisms without an
  incremental form; ``new_cache`` raises.

Shape legend: B batch, T tokens of this call, H query heads, Hkv key-value heads, D head dim, Hi / Di indexer
heads / head dim, Kp Linformer length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridattn.layers.attention import MultiHeadAttention
from hybridattn.layers.cache import Cache, KVCache, check_token_mask, token_positions
from hybridattn.layers.short_conv import check_left_padding
from hybridattn.ops._checks import check_heads_divisible, check_positive_int, check_tensor
from hybridattn.ops.dsa_attention import dsa_attention
from hybridattn.ops.linformer import linformer_attention
from hybridattn.ops.lsh_attention import lsh_attention
from hybridattn.ops.masks import MaskSpec, as_mask_spec
from hybridattn.ops.positions import apply_rotary

__all__ = ["DSAAttention", "DSACache", "LSHAttention", "LinformerAttention", "PatternAttention"]


class PatternAttention(MultiHeadAttention):
    """``MultiHeadAttention`` restricted to the pairs a mask spec keeps (ANDed with causal and padding).

    Args:
        d_model, n_heads: as :class:`MultiHeadAttention`.
        pattern: a ``MaskSpec`` such as ``masks.longformer(256, [0])`` or ``masks.bigbird(..., causal=True)``.
        **kwargs: the other options of :class:`MultiHeadAttention` except ``window``.

    Raises:
        TypeError: ``pattern`` is not a mask spec or bool tensor.
        ValueError: ``window`` given as well (use ``masks.sliding_window`` inside the pattern instead).
    """

    def __init__(self, d_model: int, n_heads: int, *, pattern: MaskSpec, **kwargs):
        if kwargs.get("window") is not None:
            raise ValueError("window: PatternAttention takes the window inside its pattern "
                             f"(masks.sliding_window(W - 1) & ...), received window={kwargs['window']}")
        super().__init__(d_model, n_heads, **kwargs)
        self.pattern = as_mask_spec(pattern, "pattern")

    def _mask(self, key_valid):
        # the parent's mask covers padding; the pattern applies on top (causal is added by softmax_attention)
        base = super()._mask(key_valid)
        return self.pattern if base is None else base & self.pattern

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.pattern!r}"


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
        b, t = _check_x(x, self.d_model)
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


class _WholeSequenceMixer(nn.Module):
    """Mixers that see the whole sequence at once: equal head split of ``d_model``, and no cache."""

    #: why there is no incremental form (completes "cache: ...")
    no_cache_reason = ""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.d_model, self.n_heads = check_positive_int("d_model", d_model), check_positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={n_heads}, received {d_model}")

    def new_cache(self, batch_size: int, *, device=None, dtype=None):
        raise ValueError(f"cache: {self.no_cache_reason}, so there is no incremental decoding; call the mixer on "
                         "full sequences with cache=None")

    def _begin(self, x, cache) -> tuple[int, int]:
        b, t = _check_x(x, self.d_model)
        if cache is not None:
            self.new_cache(b)
        return b, t


class LinformerAttention(_WholeSequenceMixer):
    """Linformer mixer (bidirectional): keys / values projected along time by learned ``E``, ``F``
    ``[proj_len, max_len]``; a call of ``T <= max_len`` tokens uses their first ``T`` columns, with padding columns
    zeroed so that padding contributes nothing."""

    no_cache_reason = "Linformer projects the whole sequence at once (bidirectional)"

    def __init__(self, d_model: int, n_heads: int, *, max_len: int = 512, proj_len: int = 64, bias: bool = False):
        super().__init__(d_model, n_heads)
        self.max_len = check_positive_int("max_len", max_len)
        self.proj_len = check_positive_int("proj_len", proj_len)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.E = nn.Parameter(torch.randn(proj_len, max_len) / math.sqrt(proj_len))
        self.F = nn.Parameter(torch.randn(proj_len, max_len) / math.sqrt(proj_len))

    def forward(self, x: torch.Tensor, *, cache=None, token_mask=None) -> torch.Tensor:
        b, t = self._begin(x, cache)
        if t > self.max_len:
            raise ValueError(f"x: expected at most max_len={self.max_len} tokens, received {t}")
        token_mask = check_token_mask(token_mask, b, t, x.device)
        q, k, v = self.qkv_proj(x).view(b, t, 3, self.n_heads, -1).unbind(2)  # (B, T, H, D) each
        e, f = self.E[:, :t], self.F[:, :t]
        if token_mask is not None:
            # per-row projections would need [B, Kp, T]; zeroing padded keys / values is the same product
            keep = token_mask[:, :, None, None].to(x.dtype)
            k, v = k * keep, v * keep
        o = linformer_attention(q, k, v, e, f)
        y = self.o_proj(o.reshape(b, t, self.d_model))
        return y if token_mask is None else y * token_mask.unsqueeze(-1).to(y.dtype)


class LSHAttention(_WholeSequenceMixer):
    """Reformer mixer: shared-QK LSH attention (``n_buckets``, ``n_hashes`` rounds, chunks of ``T / n_buckets``).
    Bucketing depends on the whole sequence, so there is no incremental form and padding is not supported."""

    no_cache_reason = "LSH buckets and chunks depend on the whole sequence"

    def __init__(self, d_model: int, n_heads: int, *, n_buckets: int = 8, n_hashes: int = 2, causal: bool = True,
                 seed: int = 0, bias: bool = False):
        super().__init__(d_model, n_heads)
        self.n_buckets, self.n_hashes = n_buckets, n_hashes
        self.causal, self.seed = bool(causal), seed
        self.qk_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, *, cache=None, token_mask=None) -> torch.Tensor:
        b, t = self._begin(x, cache)
        token_mask = check_token_mask(token_mask, b, t, x.device)
        if token_mask is not None and not bool(token_mask.all()):
            raise ValueError("token_mask: LSH attention does not support padding; expected all True")
        q = self.qk_proj(x).view(b, t, self.n_heads, -1)
        v = self.v_proj(x).view(b, t, self.n_heads, -1)
        o = lsh_attention(q, None, v, n_buckets=self.n_buckets, n_hashes=self.n_hashes, causal=self.causal,
                          seed=self.seed)
        return self.o_proj(o.reshape(b, t, self.d_model))


def _check_x(x, d_model: int) -> tuple[int, int]:
    check_tensor("x", x, ndim=3)
    if x.shape[-1] != d_model:
        raise ValueError(f"x: expected [B, T, d_model={d_model}], received {tuple(x.shape)}")
    return x.shape[0], x.shape[1]
