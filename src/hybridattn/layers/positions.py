"""Positional encodings with learned state: absolute embeddings and the T5 bucketed relative bias.

- :class:`LearnedPositionEmbedding`: a table ``[max_positions, dim]`` indexed by integer positions and added to
  the token embeddings by the model (GPT-2, BERT).
- :class:`T5RelativeBias`: a learned scalar per (bucket, head) added to the logits (Raffel et al., 2020). The
  relative position ``j - pos_q`` falls into one of ``num_buckets`` buckets: exact buckets for small distances,
  logarithmically wider ones up to ``max_distance``, one bucket for everything beyond. The bidirectional variant
  spends half the buckets on keys after the query; the causal one folds the future onto distance 0.
  ``module()`` returns a :class:`~hybridattn.ops.scores.ScoreBias`, so the bias goes through every backend (the
  tiled one asks for one block at a time) and gradients reach the table.

Shape legend: B batch, T length, H heads, Tq query length, Tk key length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridattn.ops._checks import check_positive_int
from hybridattn.ops.positions import check_integer_positions
from hybridattn.ops.scores import ScoreBias


class LearnedPositionEmbedding(nn.Module):
    """Learned absolute positions: ``forward(positions) -> table[positions]``.

    Args:
        max_positions: number of rows of the table.
        dim: embedding width.

    Forward args:
        positions: integer tensor of any shape, values in ``[0, max_positions)``.

    Returns:
        ``[..., dim]``.

    Raises:
        TypeError: non-integer positions. ValueError: a position outside the table.
    """

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.max_positions = check_positive_int("max_positions", max_positions)
        self.dim = check_positive_int("dim", dim)
        self.weight = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        check_integer_positions(positions)
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.max_positions):
            raise ValueError(
                f"positions: expected values in [0, max_positions={self.max_positions}), "
                f"received min {int(positions.min())}, max {int(positions.max())}"
            )
        return self.weight[positions]

    def extra_repr(self) -> str:
        return f"{self.max_positions}, {self.dim}"


def t5_relative_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucket of ``relative_position = key_pos - query_pos`` (long tensor of any shape, same shape back).

    Bidirectional: buckets ``[0, n/2)`` for keys at or before the query, ``[n/2, n)`` for keys after it. Within each
    half (or all ``n`` buckets when causal, where keys after the query count as distance 0), the first half of the
    buckets are exact distances and the rest grow logarithmically up to ``max_distance``.
    """
    n = num_buckets
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        n //= 2
        bucket = bucket + (relative_position > 0).to(relative_position.dtype) * n
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = n // 2
    # clamp before the log so distance 0 never produces -inf (the `where` discards those entries anyway)
    scaled = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (n - max_exact)).to(relative_position.dtype)).clamp(max=n - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


class T5RelativeBias(nn.Module):
    """Learned T5 relative position bias, one scalar per bucket and head.

    Args:
        num_heads: H.
        num_buckets: buckets of relative distance (T5: 32).
        max_distance: distance beyond which all pairs share the last bucket (T5: 128).
        bidirectional: encoder-style (both directions) or decoder-style (causal) bucketing.

    Forward: ``module() -> ScoreBias`` whose ``block``/``dense`` build ``[1, H, tq, tk]`` from the table, queries
    aligned bottom-right (query ``i`` at key position ``i + Tk - Tq``), so a cached decode step sees the last row.

    Raises:
        ValueError: ``num_buckets`` < 4 or ``max_distance`` not larger than the exact range.
    """

    def __init__(self, num_heads: int, *, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.num_buckets = check_positive_int("num_buckets", num_buckets)
        self.max_distance = check_positive_int("max_distance", max_distance)
        self.bidirectional = bool(bidirectional)
        if num_buckets < 4:
            raise ValueError(f"num_buckets: expected >= 4 (exact and logarithmic buckets), received {num_buckets}")
        exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        if max_distance <= exact:
            raise ValueError(f"max_distance: expected > {exact} (the exact-distance range), received {max_distance}")
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self) -> ScoreBias:
        return _T5Bias(self)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
            f"bidirectional={self.bidirectional}"
        )


class _T5Bias(ScoreBias):
    def __init__(self, module: T5RelativeBias):
        self.module = module
        self.num_heads = module.num_heads

    def grad_tensors(self):
        # the tiled backend recomputes block() in its backward and sends the bias gradient here
        weight = self.module.weight
        return (weight,) if weight.requires_grad else ()

    def _buckets(self, relative_position):
        m = self.module
        return t5_relative_bucket(
            relative_position, bidirectional=m.bidirectional, num_buckets=m.num_buckets, max_distance=m.max_distance
        )

    def block(self, q_len, kv_len, q_idx, kv_idx, *, dtype=torch.float32):
        weight = self.module.weight
        q_pos = q_idx.to(weight.device) + (kv_len - q_len)
        buckets = self._buckets(kv_idx.to(weight.device).unsqueeze(-2) - q_pos.unsqueeze(-1))
        return weight[buckets].permute(2, 0, 1).unsqueeze(0).to(dtype)  # [tq, tk, H] -> [1, H, tq, tk]

    def score_mod(self, q_len, kv_len):
        weight, buckets_of, offset = self.module.weight, self._buckets, kv_len - q_len

        def mod(score, b, h, q, k):
            return score + weight[buckets_of(k - (q + offset)), h].to(score.dtype)

        return mod

    def __repr__(self):
        return f"T5Bias({self.module.extra_repr()})"
