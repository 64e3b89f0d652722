"""Multi-head softmax attention as a mixer: GQA, RoPE / ALiBi / T5 / NoPE, the Qwen3-Next options (output gate,
q/k RMSNorm, partial RoPE), sliding windows and sparse patterns, cross-attention, and KV caches for decoding.

Per call (self-attention)::

    q, gate = split(q_proj(x))              # [B, T, H, D] each (gate only with output_gate)
    k, v    = k_proj(x), v_proj(x)          # [B, T, Hkv, D]
    q, k    = norm(q), norm(k)              # qk_norm: RMSNorm over D, per head
    q, k    = rope(q, pos), rope(k, pos)    # pos counts real tokens, continuing the cache
    k, v    = cache.update(k, v)            # all cached keys, the new ones last
    o       = softmax_attention(q, k, v)    # causal aligned bottom-right, padding and pattern masked
    y       = o_proj(o * sigmoid(gate))     # [B, T, d_model]

A pattern (``pattern=masks.longformer(256, [0])``, ``window=W``) is a mask spec of token positions: each row's
real tokens count from 0, whatever its left padding or what the cache dropped, so a padded row attends as it
would alone. The cache follows the pattern's reach (:meth:`hybridattn.ops.masks.MaskSpec.reach`): a ring buffer
of ``lookback + 1`` keys when the reach is bounded, plus the pinned global tokens when there are some, otherwise
the growing ``KVCache``.

Shape legend: B batch, T tokens of this call, L cached keys, Tm memory length, H query heads, Hkv key/value heads,
D head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridattn.layers.cache import (
    Cache, KVCache, PinnedWindowKVCache, SlidingWindowKVCache, check_token_mask, slot_positions, token_positions,
)
from hybridattn.layers.norms import RMSNorm
from hybridattn.layers.positions import T5RelativeBias
from hybridattn.layers.short_conv import check_left_padding
from hybridattn.ops._checks import check_choice, check_heads_divisible, check_positive_int, check_tensor
from hybridattn.ops.masks import MaskSpec, Reach, TensorMask, as_mask_spec, at_positions
from hybridattn.ops.positions import ALiBi, alibi_slopes, apply_rotary, check_rope_scaling, rotary_dim
from hybridattn.ops.softmax_attention import softmax_attention
from hybridattn.ops.sparse_masks import sliding_window

POSITIONS = ("rope", "alibi", "t5", "nope", "none")


class MultiHeadAttention(nn.Module):
    """Softmax attention mixer (the mixer protocol of docs/dev/CONTRACTS.md).

    Args:
        d_model: model width.
        n_heads: query heads H.
        n_kv_heads: key/value heads (GQA/MQA); must divide ``n_heads``. None = ``n_heads``.
        head_dim: D; None = ``d_model // n_heads`` (then ``d_model`` must be divisible by ``n_heads``).
        causal: causal self-attention. None = True for self-attention, False for cross-attention.
        positions: "rope", "alibi", "t5" (learned bucketed bias) or "nope"/"none". None = "rope" for
            self-attention, "nope" for cross-attention (which takes no positions). Absolute encodings
            (``sinusoidal_positions``, ``LearnedPositionEmbedding``) are added to the embeddings by the model.
        rope_theta: RoPE base.
        rotary_fraction: share of D rotated by RoPE (Qwen3-Next: 0.25).
        rope_scaling: RoPE context extension, a dict ``{"rope_type": "linear" | "dynamic" | "yarn" | "llama3" |
            "longrope", ...}`` (see :data:`hybridattn.ops.positions.ROPE_SCALING`); None = plain RoPE.
        qk_norm: RMSNorm over D on every q and k head, before RoPE.
        zero_centered_norm: the q/k norms scale by ``1 + w`` (Qwen3-Next) instead of ``w``.
        norm_eps: epsilon of the q/k norms.
        output_gate: ``q_proj`` also emits a gate; ``o * sigmoid(gate)`` before ``o_proj``. The projection has
            width ``2 * H * D`` with ``[q_h, gate_h]`` side by side per head, the Hugging Face Qwen3-Next layout.
        cross: attend to ``memory`` (encoder output) instead of ``x``; keys/values come from the memory.
        bias: biases on the four projections.
        window: sliding window (keys ``pos_q - window < j <= pos_q``): shorthand for
            ``pattern=masks.sliding_window(window - 1)``; with a ``pattern`` as well, both apply (their AND). Its
            cache is a ring buffer of ``window`` slots. Requires causal self-attention.
        pattern: a mask spec of token positions (:mod:`hybridattn.ops.masks`: ``sliding_window``, ``dilated``,
            ``longformer``, ``bigbird(..., causal=True)``, ``fixed``, ``block_sparse``... combined with ``&`` /
            ``|``), ANDed with causal and padding. Positions count each row's real tokens. Self-attention only.
        backend: passed to :func:`hybridattn.ops.softmax_attention` ("auto", "naive", "sdpa", "tiled", "flex").
        scale: logit scale; None = ``D ** -0.5``.
        softcap: optional logit softcap.
        relative_bias: a :class:`T5RelativeBias` to share between layers (T5 computes it once per stack); None
            builds one for ``positions="t5"``.
        t5_num_buckets, t5_max_distance: of the T5 bias built here.

    Raises:
        ValueError: inconsistent sizes (``d_model`` vs heads, ``n_heads % n_kv_heads``), an unknown position
            scheme, a window without causal self-attention, a pattern or positions on cross-attention.
        TypeError: ``pattern`` is not a mask spec or bool tensor.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        causal: bool | None = None,
        positions: str | None = None,
        rope_theta: float = 10000.0,
        rotary_fraction: float = 1.0,
        rope_scaling: dict | None = None,
        qk_norm: bool = False,
        zero_centered_norm: bool = False,
        norm_eps: float = 1e-6,
        output_gate: bool = False,
        cross: bool = False,
        bias: bool = False,
        window: int | None = None,
        pattern: MaskSpec | None = None,
        backend: str = "auto",
        scale: float | None = None,
        softcap: float | None = None,
        relative_bias: T5RelativeBias | None = None,
        t5_num_buckets: int = 32,
        t5_max_distance: int = 128,
    ):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.n_heads = check_positive_int("n_heads", n_heads)
        self.n_kv_heads = n_heads if n_kv_heads is None else check_positive_int("n_kv_heads", n_kv_heads)
        check_heads_divisible("n_heads", n_heads, "n_kv_heads", self.n_kv_heads)
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(
                    f"d_model: expected a multiple of n_heads={n_heads} (or pass head_dim), received {d_model}"
                )
            head_dim = d_model // n_heads
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.cross = bool(cross)
        self.causal = (not self.cross) if causal is None else bool(causal)
        if self.cross and self.causal:
            raise ValueError(
                "causal: cross-attention to a memory is not causal; expected causal=False or None, received True"
            )
        positions = ("nope" if self.cross else "rope") if positions is None else positions
        check_choice("positions", positions, POSITIONS)
        self.positions = "nope" if positions == "none" else positions
        if self.cross and self.positions != "nope":
            raise ValueError(f"positions: cross-attention takes no positions; expected 'nope', received {positions!r}")
        if window is not None:
            check_positive_int("window", window)
            if not self.causal:
                raise ValueError(f"window: a sliding window needs causal self-attention, received causal={self.causal}")
        self.window = window
        self.pattern = None if pattern is None else as_mask_spec(pattern, "pattern")
        if self.pattern is not None and self.cross:
            raise ValueError("pattern: a pattern of token positions needs self-attention, received cross=True")
        #: what the layer masks (pattern AND window) and how far back it reaches, or None without either
        self._spec = self.pattern
        if window is not None:
            in_window = sliding_window(window - 1)  # W keys: the query itself and W - 1 before it
            self._spec = in_window if self._spec is None else self._spec & in_window
        self._reach = None if self._spec is None else self._spec.reach()
        self.rope_theta, self.rotary_fraction = rope_theta, rotary_fraction
        self.rope_scaling = None
        if self.positions == "rope":
            rotated = rotary_dim(head_dim, rotary_fraction)  # validate now rather than on the first forward
            self.rope_scaling = check_rope_scaling(rope_scaling, rotary_dim=rotated)
        elif rope_scaling is not None:
            raise ValueError(f"rope_scaling: only used with positions='rope', received positions={positions!r}")
        self.backend, self.scale, self.softcap = backend, scale, softcap
        self.output_gate = bool(output_gate)

        hd = self.head_dim
        self.q_proj = nn.Linear(d_model, n_heads * hd * (2 if output_gate else 1), bias=bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(n_heads * hd, d_model, bias=bias)
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = RMSNorm(hd, eps=norm_eps, zero_centered=zero_centered_norm)
            self.k_norm = RMSNorm(hd, eps=norm_eps, zero_centered=zero_centered_norm)
        if relative_bias is not None and self.positions != "t5":
            raise ValueError(f"relative_bias: only used with positions='t5', received positions={positions!r}")
        self.relative_bias = None
        if self.positions == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(n_heads), persistent=False)
        elif self.positions == "t5":
            if relative_bias is None:
                relative_bias = T5RelativeBias(
                    n_heads, num_buckets=t5_num_buckets, max_distance=t5_max_distance, bidirectional=not self.causal
                )
            self.relative_bias = relative_bias
            if self.relative_bias.num_heads != n_heads:
                raise ValueError(
                    f"relative_bias: expected {n_heads} heads (n_heads), received {self.relative_bias.num_heads}"
                )

    # -- the mixer protocol --------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, *, device=None, dtype=None) -> Cache:
        """An empty cache for ``batch_size`` rows that follows the pattern's reach: a ring buffer of
        ``lookback + 1`` slots when it is bounded (a window), the same plus the pinned global tokens
        (Longformer), a growing KV cache otherwise (for cross-attention it holds the memory's keys/values).

        Raises:
            ValueError: a pattern that cannot be decoded token by token (see ``_decode_reach``).
        """
        device = self.k_proj.weight.device if device is None else device
        dtype = self.k_proj.weight.dtype if dtype is None else dtype
        sizes = (batch_size, self.n_kv_heads, self.head_dim)
        reach = self._decode_reach()
        if reach.lookback is None:
            return KVCache(*sizes, device=device, dtype=dtype)
        if reach.pinned:
            return PinnedWindowKVCache(*sizes, reach.lookback + 1, reach.pinned, device=device, dtype=dtype)
        return SlidingWindowKVCache(*sizes, reach.lookback + 1, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        *,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            x: ``[B, T, d_model]``.
            cache: from ``new_cache``; mutated in place. For cross-attention it caches the memory's keys/values:
                pass ``memory`` on the first call (or to replace it) and ``None`` afterwards.
            token_mask: ``[B, T]`` bool, False = left padding (masked as keys, excluded from RoPE positions, output
                zeroed).
            memory: ``[B, Tm, d_model]`` for cross-attention.
            memory_mask: ``[B, Tm]`` bool, False = padding in the memory.

        Returns:
            ``[B, T, d_model]``.

        Raises:
            ValueError / TypeError: wrong shapes, dtypes or devices; memory without ``cross`` or missing memory.
        """
        b, t = self._check_input("x", x)
        token_mask = check_left_padding(token_mask, b, t, x.device)  # None when every token is real
        if cache is not None:
            self._check_cache(cache)

        q, gate = self._queries(x)
        if self.cross:
            k, v, key_valid = self._memory_keys(memory, memory_mask, cache, b)
        else:
            if memory is not None or memory_mask is not None:
                raise ValueError("memory: expected None for self-attention (build the layer with cross=True)")
            k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
            v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.positions == "rope":
                start = None if cache is None else cache.real_tokens
                pos = token_positions(token_mask, t, start=start, device=x.device)
                # one rotation over the heads of q and k together: the angles are computed once (decode steps
                # are dominated by per-op overhead, not by arithmetic)
                qk = torch.cat((q, k), dim=2)  # (B, T, H + Hkv, D)
                qk = apply_rotary(qk, pos, theta=self.rope_theta, rotary_fraction=self.rotary_fraction,
                                  scaling=self.rope_scaling)
                q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)
            if cache is None:
                key_valid = token_mask
            else:
                k, v, key_valid = cache.update(k, v, token_mask)

        o = softmax_attention(
            q, k, v,
            # one query after all its keys sees every key under the bottom-right causal mask, so skip the mask
            causal=self.causal and t > 1,
            mask=self._mask(key_valid, self._pattern_at(t, k.shape[1], cache, token_mask)),
            bias=self._bias(),
            scale=self.scale,
            softcap=self.softcap,
            backend=self.backend,
        )
        o = o.reshape(b, t, self.n_heads * self.head_dim)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        y = self.o_proj(o)
        if token_mask is not None:
            y = y * token_mask.unsqueeze(-1).to(y.dtype)
        return y

    # -- parts ---------------------------------------------------------------------------------------------
    def _check_input(self, name: str, x) -> tuple[int, int]:
        check_tensor(name, x, ndim=3)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"{name}: expected [B, T, d_model={self.d_model}], received {tuple(x.shape)}")
        return x.shape[0], x.shape[1]

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, (KVCache, SlidingWindowKVCache)):
            raise TypeError(f"cache: expected the KVCache from new_cache(), received {type(cache).__name__}")
        if not (self.causal or self.cross):
            # earlier tokens would have to see later ones, which a cache of the past cannot give them
            raise ValueError("cache: incremental decoding needs causal self-attention; this layer has causal=False")
        reach = self._decode_reach()
        if isinstance(cache, SlidingWindowKVCache):
            # a ring buffer shorter than the pattern's reach would silently drop keys the layer must see
            pinned = cache.pinned if isinstance(cache, PinnedWindowKVCache) else ()
            if reach.lookback is None or cache.window <= reach.lookback or not set(reach.pinned) <= set(pinned):
                expected = "a KVCache"
                if reach.lookback is not None:
                    kind = "PinnedWindowKVCache" if reach.pinned else "SlidingWindowKVCache"
                    expected += f" or a {kind} of window >= {reach.lookback + 1}"
                    if reach.pinned:
                        expected += f" pinning positions {list(reach.pinned)}"
                received = f"of window {cache.window}" + (f" pinning {list(pinned)}" if pinned else "")
                raise ValueError(f"cache: expected {expected} for this layer, received a {type(cache).__name__} "
                                 f"{received}")

    def _decode_reach(self) -> Reach:
        """What the cache must keep: the pattern's reach, unbounded without a pattern. Raises ValueError for a
        pattern that a cache cannot continue."""
        if self._reach is None:
            return Reach()
        if not self._reach.prefix_stable:
            # the pairs kept among the first N tokens would change as the sequence grows, so a decoded token would
            # not attend as in the full forward (e.g. BigBird drawing random blocks among future ones)
            raise ValueError(
                "pattern: incremental decoding needs a pattern whose kept pairs do not depend on the sequence "
                f"length (e.g. masks.bigbird(..., causal=True), not causal=False), received {self._spec!r}"
            )
        if self._reach.pinned and self.positions in ("alibi", "t5"):
            # these biases follow column distances, which pinned keys in front of the window would break
            return Reach()
        return self._reach

    def _queries(self, x):
        b, t = x.shape[:2]
        if self.output_gate:
            # HF Qwen3-Next layout: per head, D query channels followed by D gate channels
            q, gate = self.q_proj(x).view(b, t, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(b, t, self.n_heads * self.head_dim)
        else:
            q, gate = self.q_proj(x).view(b, t, self.n_heads, self.head_dim), None  # (B, T, H, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return q, gate

    def _memory_keys(self, memory, memory_mask, cache, batch):
        if memory is None:
            if not isinstance(cache, KVCache) or cache.seen_tokens == 0:
                raise ValueError(
                    "memory: expected [B, Tm, d_model] for cross-attention (or a cache holding it), received None"
                )
            return cache.contents()
        self._check_input("memory", memory)
        if memory.shape[0] != batch:
            raise ValueError(f"memory: expected batch size {batch} (the batch of x), received {memory.shape[0]}")
        tm = memory.shape[1]
        memory_mask = check_token_mask(memory_mask, batch, tm, memory.device) if memory_mask is not None else None
        k = self.k_proj(memory).view(batch, tm, self.n_kv_heads, self.head_dim)  # (B, Tm, Hkv, D)
        v = self.v_proj(memory).view(batch, tm, self.n_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if cache is None:
            return k, v, _drop_if_all(memory_mask)
        cache.clear()
        return cache.update(k, v, memory_mask)

    def _pattern_at(self, t: int, num_keys: int, cache, token_mask) -> MaskSpec | None:
        """The pattern for this call's ``T`` queries and ``L`` keys. Key columns are cache slots; a pattern tied to
        absolute positions (global tokens, blocks) is evaluated at each row's token positions instead, which differ
        from the slots under left padding, once a ring buffer dropped old keys, or with pinned keys in front. A
        relative pattern (windows) over consecutive slots needs no positions: the fast path."""
        if self._spec is None:
            return None
        if cache is None:
            if token_mask is None or self._reach.relative:
                return self._spec
            real = token_mask.sum(1)  # (B,)
            if not self._reach.prefix_stable:
                return _per_row_pattern(self._spec, real, t)
            positions = slot_positions(real, t)  # (B, T), padding negative
            # the longest row's length, not T: a layout sized for the real tokens need not cover the padding
            # (at least 1: a spec over zero positions has no layout, and a call may be all padding)
            return at_positions(self._spec, positions, positions, length=max(1, int(real.max())))
        if cache.consecutive and self._reach.relative:
            return self._spec
        positions = cache.key_positions(num_keys)  # (B|1, L), or None when the slots are the positions
        if positions is None:
            return self._spec
        length = max(1, int(cache.real_tokens.max()))
        return at_positions(self._spec, positions[:, num_keys - t:], positions, length=length)

    @staticmethod
    def _mask(key_valid, pattern):
        if key_valid is None:
            return pattern
        valid = TensorMask(key_valid[:, None, None, :])  # (B, 1, 1, L)
        return valid if pattern is None else valid & pattern

    def _bias(self):
        if self.positions == "alibi":
            return ALiBi(causal=self.causal, slopes=self.alibi_slopes)
        if self.positions == "t5":
            return self.relative_bias()
        return None

    def extra_repr(self) -> str:
        parts = [
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}",
            f"causal={self.causal}, positions={self.positions!r}",
        ]
        if self.positions == "rope":
            parts.append(f"rope_theta={self.rope_theta}, rotary_fraction={self.rotary_fraction}")
            if self.rope_scaling is not None:
                parts.append(f"rope_scaling={self.rope_scaling}")
        for name in ("output_gate", "cross", "window", "pattern"):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name)!r}")
        return ", ".join(parts)


def _per_row_pattern(spec: MaskSpec, real: torch.Tensor, t: int) -> TensorMask:
    """``spec`` for left-padded rows of ``real[b]`` tokens, each at its own length, as ``[B, H|1, T, T]``: for a
    pattern that changes with the sequence length (BigBird drawing random blocks among all of them), a padded row
    then attends exactly as it would alone."""
    dense = torch.zeros(real.shape[0], spec.num_heads or 1, t, t, dtype=torch.bool, device=real.device)
    for b, n in enumerate(real.tolist()):
        if n:
            dense[b, :, t - n:, t - n:] = spec.dense(n, n, device=real.device)[b if spec.batch_size else 0]
    return TensorMask(dense)


def _drop_if_all(valid: torch.Tensor | None) -> torch.Tensor | None:
    # an all-True key mask changes nothing but would push SDPA off its fused path
    return None if valid is None or bool(valid.all()) else valid
