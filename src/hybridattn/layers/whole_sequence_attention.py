"""Whole-sequence approximations of softmax attention: Linformer (low-rank projection of keys and values along
time, bidirectional) and Reformer's shared-QK LSH attention. Neither has an incremental form: ``new_cache``
raises. Follows the mixer protocol of docs/dev/CONTRACTS.md.

Shape legend: B batch, T tokens of this call, H heads, D head dim, Kp Linformer length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridattn.layers.cache import check_token_mask
from hybridattn.layers.dsa_attention import check_mixer_input
from hybridattn.ops._checks import check_positive_int
from hybridattn.ops.linformer import linformer_attention
from hybridattn.ops.lsh_attention import lsh_attention

__all__ = ["LSHAttention", "LinformerAttention"]


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
        b, t = check_mixer_input(x, self.d_model)
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
    Bucketing depends on the whole sequence, so there is no incremental form and padding is not supported. Even
    with ``causal=True`` (keys after the query masked) an output depends on later tokens, which move the bucket
    and chunk boundaries; the registry marks ``lsh`` non-causal for that reason. ``allow_duplicates`` is
    ``ops.lsh_attention``'s: ``False`` (default) counts a pair attended in several rounds once, as the paper does.

    Raises:
        ValueError / TypeError: ``n_buckets`` not 1 or a positive even int, ``n_hashes`` not a positive int,
            ``seed`` not an int >= 0, ``causal`` or ``allow_duplicates`` not a bool.
    """

    no_cache_reason = "LSH buckets and chunks depend on the whole sequence"

    def __init__(self, d_model: int, n_heads: int, *, n_buckets: int = 8, n_hashes: int = 2, causal: bool = True,
                 seed: int = 0, bias: bool = False, allow_duplicates: bool = False):
        super().__init__(d_model, n_heads)
        # validated here as ops.lsh_attention requires, so that a bad value fails at construction, not at forward
        self.n_buckets = check_positive_int("n_buckets", n_buckets)
        if n_buckets > 1 and n_buckets % 2:
            raise ValueError(f"n_buckets: expected 1 or an even number (angular LSH uses +-rotations), "
                             f"received {n_buckets}")
        self.n_hashes = check_positive_int("n_hashes", n_hashes)
        self.seed = check_positive_int("seed", seed, allow_zero=True)
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, received {type(causal).__name__}")
        self.causal = causal
        if not isinstance(allow_duplicates, bool):
            raise TypeError(f"allow_duplicates: expected a bool, received {type(allow_duplicates).__name__}")
        self.allow_duplicates = allow_duplicates
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
                          seed=self.seed, allow_duplicates=self.allow_duplicates)
        return self.o_proj(o.reshape(b, t, self.d_model))
