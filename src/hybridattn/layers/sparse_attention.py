"""Mask patterns on softmax attention: :class:`PatternAttention`, the name under which ``MultiHeadAttention`` took a
``pattern`` before the option moved into it (``MultiHeadAttention(pattern=masks.longformer(256, [0]))``). The
mixer factories (``longformer``, ``bigbird``) build it; everything it does is ``MultiHeadAttention``'s: positions
in the pattern count each row's real tokens, and the cache follows the pattern's reach.

DeepSeek Sparse Attention is in :mod:`hybridattn.layers.dsa_attention`; Linformer and Reformer LSH attention in
:mod:`hybridattn.layers.whole_sequence_attention`.
"""

from __future__ import annotations

from hybridattn.layers.attention import MultiHeadAttention
from hybridattn.ops.masks import MaskSpec

__all__ = ["PatternAttention"]


class PatternAttention(MultiHeadAttention):
    """``MultiHeadAttention`` whose ``pattern`` is required.

    Args:
        d_model, n_heads: as :class:`MultiHeadAttention`.
        pattern: a ``MaskSpec`` such as ``masks.longformer(256, [0])`` or ``masks.bigbird(..., causal=True)``.
        **kwargs: the other options of :class:`MultiHeadAttention` (``window=W`` restricts the pattern further).

    Raises:
        TypeError: ``pattern`` is not a mask spec or bool tensor (None included).
    """

    def __init__(self, d_model: int, n_heads: int, *, pattern: MaskSpec, **kwargs):
        if pattern is None:
            raise TypeError("pattern: expected a MaskSpec from hybridattn.ops.masks or a bool tensor, received None "
                            "(MultiHeadAttention takes no pattern)")
        super().__init__(d_model, n_heads, pattern=pattern, **kwargs)
