"""Mask patterns on softmax attention: :class:`PatternAttention`, ``MultiHeadAttention`` whose scores are
restricted by a mask spec (Longformer's window + global tokens, BigBird, Sparse Transformer patterns...), following
the mixer protocol of docs/dev/CONTRACTS.md. Long sequences run on the block-sparse kernel through
``softmax_attention``'s ``auto`` backend. Its cache is the growing ``KVCache``: positions in the pattern are cache
slots, so decoding continues the pattern exactly (a plain sliding window uses ``MultiHeadAttention(window=W)`` and
its ring buffer of ``W`` slots instead).

DeepSeek Sparse Attention is in :mod:`hybridattn.layers.dsa_attention`; Linformer and Reformer LSH attention in
:mod:`hybridattn.layers.whole_sequence_attention`.
"""

from __future__ import annotations

from hybridattn.layers.attention import MultiHeadAttention
from hybridattn.ops.masks import MaskSpec, as_mask_spec

__all__ = ["PatternAttention"]


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
