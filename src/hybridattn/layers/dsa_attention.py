"""DeepSeek Sparse Attention mixer (DeepSeek-V3.2): a lightning indexer picks ``top_k`` past keys per query and
softmax runs over those only; its cache keeps the indexer keys beside the attention keys and values. Follows the
mixer protocol of docs/dev/CONTRACTS.md.

Per call::

    q, k, v, gate = MultiHeadAttention's projections, q/k norm, RoPE (partial, scaled) or none
    index_q, index_k, w = indexer projections of x.detach()      # the LM loss never reaches the indexer
    o, S, P = dsa_attention(q, k, v, index_q, index_k, w)        # S: selected keys, P: probabilities over S
    y       = o_proj(o * sigmoid(gate))
    aux_loss = indexer_kl_loss(index_q, index_k, w, S, P)        # on demand, after a forward with gradients

Shape legend: B batch, T tokens of this call, H query heads, Hkv key-value heads, D head dim, Hi / Di indexer
heads / head dim, L cached slots.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridattn.layers.attention import MultiHeadAttention
from hybridattn.layers.cache import Cache, KVCache, token_positions
from hybridattn.layers.short_conv import check_left_padding
from hybridattn.ops._checks import check_positive_int, check_shape, check_tensor
from hybridattn.ops.dsa_attention import dsa_attention, indexer_kl_loss
from hybridattn.ops.positions import apply_rotary

__all__ = ["DSAAttention", "DSACache", "check_mixer_input"]


class DSACache(Cache):
    """Keys / values of the attention (``kv``, a growing :class:`KVCache`) and one indexer key ``[Di]`` per slot
    (``index_k`` ``[B, capacity, Di]``, grown with ``kv`` and sharing its validity and real-token counts)."""

    def __init__(self, batch_size, num_kv_heads, head_dim, index_dim, *, device=None, dtype=torch.float32):
        super().__init__()
        self.kv = KVCache(batch_size, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.index_dim = check_positive_int("index_dim", index_dim)
        self.index_k = torch.zeros(batch_size, self.kv.capacity, index_dim, device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size

    @property
    def real_tokens(self):
        return self.kv.real_tokens

    def tensors(self):
        return self.kv.tensors() + [self.index_k]

    def reset(self) -> None:
        """Forget every token, keeping the storage (the indexer keys are overwritten as slots refill)."""
        self.kv.reset()
        self.seen_tokens = 0

    def update(self, k, v, index_k, token_mask):
        """Append keys / values ``[B, T, Hkv, D]`` and indexer keys ``[B, T, Di]``; returns every cached slot's
        ``(k, v, index_k, key_valid)`` (as :meth:`KVCache.update`, plus ``[B, L, Di]`` indexer keys)."""
        check_tensor("index_k", index_k, ndim=3)
        check_shape("index_k", index_k, (self.batch_size, k.shape[1], self.index_dim))
        if index_k.dtype != self.index_k.dtype:
            raise TypeError(f"index_k: expected dtype {self.index_k.dtype} (the cache's dtype), "
                            f"received {index_k.dtype}")
        start = self.kv.length
        k_all, v_all, key_valid = self.kv.update(k, v, token_mask)
        end = self.kv.length
        if self.index_k.shape[1] < self.kv.capacity:  # the KV storage doubled: follow it
            grown = self.index_k.new_zeros(self.batch_size, self.kv.capacity, self.index_dim)
            grown[:, :start] = self.index_k[:, :start]
            self.index_k = grown
        self.index_k[:, start:end] = index_k
        self.seen_tokens = self.kv.seen_tokens
        return k_all, v_all, self.index_k[:, :end], key_valid


class DSAAttention(MultiHeadAttention):
    """DeepSeek Sparse Attention mixer: :class:`MultiHeadAttention`'s projections, norms, output gate and RoPE,
    plus a lightning indexer (``index_heads`` ReLU heads of ``index_dim``, weighted per query) choosing
    ``top_k`` past keys per query; softmax runs over those.

    The indexer reads a detached input and gets no gradient through the top-k choice; after a forward with
    gradients enabled (and no cache) ``aux_loss`` is its KL loss against the main attention
    (:func:`hybridattn.ops.dsa_attention.indexer_kl_loss`), which trains the indexer and only the indexer.

    Args:
        d_model, n_heads: model width, query heads H.
        top_k: keys kept per query.
        index_heads, index_dim: Hi, Di of the indexer.
        positions: "rope" or "nope"/"none"; the sparse op takes no score bias, so not ALiBi / T5.
        **kwargs: ``n_kv_heads``, ``head_dim``, ``rope_theta``, ``rotary_fraction``, ``rope_scaling``, ``qk_norm``,
            ``zero_centered_norm``, ``norm_eps``, ``output_gate``, ``bias``, ``scale`` as :class:`MultiHeadAttention`.

    Raises:
        ValueError / TypeError: as :class:`MultiHeadAttention`; a position scheme with a bias; bad indexer sizes.
    """

    def __init__(self, d_model: int, n_heads: int, *, top_k: int = 64, index_heads: int = 4, index_dim: int = 32,
                 positions: str = "rope", **kwargs):
        if positions not in ("rope", "nope", "none"):
            raise ValueError(f"positions: expected 'rope', 'nope' or 'none' (DSA's sparse op takes no score bias), "
                             f"received {positions!r}")
        allowed = {"n_kv_heads", "head_dim", "rope_theta", "rotary_fraction", "rope_scaling", "qk_norm",
                   "zero_centered_norm", "norm_eps", "output_gate", "bias", "scale"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"{unknown[0]}: not an option of DSAAttention; expected one of {sorted(allowed)}")
        super().__init__(d_model, n_heads, causal=True, positions=positions, **kwargs)
        self.top_k = check_positive_int("top_k", top_k)
        self.index_heads = check_positive_int("index_heads", index_heads)
        self.index_dim = check_positive_int("index_dim", index_dim)
        self.index_q_proj = nn.Linear(d_model, index_heads * index_dim, bias=False)
        self.index_k_proj = nn.Linear(d_model, index_dim, bias=False)
        self.index_w_proj = nn.Linear(d_model, index_heads, bias=False)
        self._indexer_state: tuple | None = None  # what aux_loss needs from the last forward with gradients

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
        q, gate = self._queries(x)  # (B, T, H, D), gate (B, T, H*D) or None
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.positions == "rope":
            pos = token_positions(token_mask, t, start=None if cache is None else cache.real_tokens, device=x.device)
            q, k = (apply_rotary(y, pos, theta=self.rope_theta, rotary_fraction=self.rotary_fraction,
                                 scaling=self.rope_scaling) for y in (q, k))
        # DeepSeek-V3.2 detaches the indexer's input: the indexer learns from its KL loss alone, and that loss
        # does not move the main model
        xi = x.detach()
        index_q = self.index_q_proj(xi).view(b, t, self.index_heads, self.index_dim)  # (B, T, Hi, Di)
        index_k = self.index_k_proj(xi)  # (B, T, Di)
        # DeepSeek-V3.2 scales the per-head weights by Hi^-1/2 (and the scores by Di^-1/2)
        weights = self.index_w_proj(xi) / math.sqrt(self.index_heads * self.index_dim)
        key_valid = token_mask
        if cache is not None:
            k, v, index_k, key_valid = cache.update(k, v, index_k, token_mask)
        # keep the selection and probabilities of this pass for aux_loss only when it can train (caches are
        # for inference); the probabilities are held by autograd for the backward anyway
        training = cache is None and torch.is_grad_enabled()
        out = dsa_attention(q, k, v, index_q, index_k, top_k=self.top_k, causal=True, index_weights=weights,
                            scale=self.scale, key_mask=key_valid, return_indices=training, return_weights=training)
        self._indexer_state = None
        if training:
            out, (indices, valid), probs = out
            self._indexer_state = (index_q, index_k, weights, indices, valid, probs.detach(), token_mask)
        o = out.reshape(b, t, self.n_heads * self.head_dim)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        y = self.o_proj(o)
        return y if token_mask is None else y * token_mask.unsqueeze(-1).to(y.dtype)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The indexer's KL loss for the last forward (mean over real query tokens), computed on demand; None when
        that forward ran without gradients or with a cache."""
        if self._indexer_state is None:
            return None
        index_q, index_k, weights, indices, valid, probs, token_mask = self._indexer_state
        return indexer_kl_loss(index_q, index_k, weights, indices, valid, probs, query_mask=token_mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, index_heads={self.index_heads}, index_dim={self.index_dim}"


def check_mixer_input(x, d_model: int) -> tuple[int, int]:
    """``(B, T)`` of a mixer input ``x [B, T, d_model]``; raises TypeError / ValueError naming ``x`` otherwise."""
    check_tensor("x", x, ndim=3)
    if x.shape[-1] != d_model:
        raise ValueError(f"x: expected [B, T, d_model={d_model}], received {tuple(x.shape)}")
    return x.shape[0], x.shape[1]
