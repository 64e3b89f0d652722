"""Positional encodings without learned state: sinusoidal absolute, RoPE (full or partial), ALiBi. NoPE is simply
"no positions" (the attention op is called without any of these).

- Sinusoidal (Vaswani et al., 2017): ``PE[p, 2i] = sin(p / base^(2i/d))``, ``PE[p, 2i+1] = cos(p / base^(2i/d))``,
  added to the token embeddings.
- RoPE (Su et al., 2021) in the Hugging Face / Qwen "rotate_half" layout: the first ``rotary_dim`` channels of each
  head are split in two halves ``(x1, x2)`` and rotated pairwise, ``(x1 cos - x2 sin, x2 cos + x1 sin)`` with angle
  ``p * inv_freq[i]``, ``inv_freq[i] = theta^(-2i / rotary_dim)``; the remaining channels pass through untouched
  (Qwen3-Next rotates 25% of the head dim). Positions are explicit integers so that cached decoding and left
  padding give every real token its own index.
- ALiBi (Press et al., 2022): a per-head linear penalty ``-m_h * distance`` on the logits, as a
  :class:`~hybridattn.ops.scores.ScoreBias` with closed forms so no backend needs the ``Tq x Tk`` matrix.

Shape legend: B batch, T sequence length, H heads, D head dim, Tq query length, Tk key length.
"""

from __future__ import annotations

import math

import torch

from hybridattn.ops._checks import check_bthd, check_positive_int, check_tensor
from hybridattn.ops.scores import ScoreBias


def check_integer_positions(positions) -> None:
    """TypeError unless ``positions`` is a tensor of an integer dtype."""
    check_tensor("positions", positions, floating=False)
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions: expected an integer dtype, received {positions.dtype}")


def _check_positions(positions, batch: int, seq_len: int) -> torch.Tensor:
    """Integer positions ``[T]`` or ``[B, T]``, returned as ``[1|B, T]``."""
    check_integer_positions(positions)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.dim() != 2 or positions.shape[0] not in (1, batch) or positions.shape[1] != seq_len:
        raise ValueError(
            f"positions: expected shape [T={seq_len}] or [B={batch}, T={seq_len}], received {tuple(positions.shape)}"
        )
    return positions


def _angle_dtype(dtype: torch.dtype) -> torch.dtype:
    # Angles p * inv_freq lose digits fast in low precision (p ~ 1e4 needs ~14 bits before the point), so they are
    # formed in at least float32, and in float64 for the float64 references.
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinusoidal_positions(
    positions: torch.Tensor, dim: int, *, base: float = 10000.0, dtype=torch.float32
) -> torch.Tensor:
    """The fixed sinusoidal absolute encoding of "Attention Is All You Need" (sin on even, cos on odd channels).

    Args:
        positions: integer tensor of any shape ``[...]`` (e.g. ``[T]`` or ``[B, T]``).
        dim: embedding width, even.
        base: wavelength base.
        dtype: output dtype.

    Returns:
        ``[..., dim]`` on the device of ``positions``.

    Raises:
        TypeError: ``positions`` is not an integer tensor.
        ValueError: ``dim`` is not a positive even int.
    """
    check_integer_positions(positions)
    check_positive_int("dim", dim)
    if dim % 2:
        raise ValueError(f"dim: expected an even embedding width, received {dim}")
    work = _angle_dtype(dtype)
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=work) / dim)
    angles = positions.to(work).unsqueeze(-1) * inv_freq  # [..., dim/2]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).to(dtype)


def rotary_dim(head_dim: int, rotary_fraction: float = 1.0) -> int:
    """Number of rotated channels, ``int(head_dim * rotary_fraction)`` as in Hugging Face; must be even."""
    check_positive_int("head_dim", head_dim)
    if not isinstance(rotary_fraction, (int, float)) or not 0.0 < rotary_fraction <= 1.0:
        raise ValueError(f"rotary_fraction: expected a number in (0, 1], received {rotary_fraction!r}")
    n = int(head_dim * rotary_fraction)
    if n == 0 or n % 2:
        raise ValueError(
            f"rotary_fraction: expected head_dim * rotary_fraction to be a positive even channel count, "
            f"received head_dim={head_dim} * {rotary_fraction} -> {n}"
        )
    return n


def rope_frequencies(
    head_dim: int, *, theta: float = 10000.0, rotary_fraction: float = 1.0, device=None, dtype=torch.float32
) -> torch.Tensor:
    """RoPE inverse frequencies ``theta^(-2i / rotary_dim)``, ``[rotary_dim / 2]`` (the HF ``inv_freq``).

    Raises:
        ValueError: ``theta <= 0`` or a rotary fraction that gives an odd or empty channel count.
    """
    n = rotary_dim(head_dim, rotary_fraction)
    if not theta > 0:
        raise ValueError(f"theta: expected a positive base, received {theta!r}")
    return theta ** (-torch.arange(0, n, 2, device=device, dtype=dtype) / n)


def apply_rotary(
    x: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0, rotary_fraction: float = 1.0
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of every head by its token's position (rotate_half layout).

    Args:
        x: ``[B, T, H, D]`` queries or keys.
        positions: integer ``[T]`` (shared by the batch) or ``[B, T]`` (per row, e.g. after left padding or with
            a cache offset).
        theta: RoPE base.
        rotary_fraction: share of ``D`` that is rotated; the rest passes through unchanged.

    Returns:
        ``[B, T, H, D]``, same dtype as ``x``; the rotation itself is computed in at least float32.

    Raises:
        TypeError: ``x`` not floating, ``positions`` not integer.
        ValueError: bad shapes, or a fraction giving an odd or empty rotary width.
    """
    b, t, _, d = check_bthd("x", x)
    positions = _check_positions(positions, b, t)
    if positions.device != x.device:
        raise ValueError(f"positions: expected device {x.device} (the device of x), received {positions.device}")
    work = _angle_dtype(x.dtype)
    inv_freq = rope_frequencies(d, theta=theta, rotary_fraction=rotary_fraction, device=x.device, dtype=work)
    n = 2 * inv_freq.numel()
    angles = positions.to(work).unsqueeze(-1) * inv_freq  # [1|B, T, n/2]
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # [1|B, T, 1, n]: both halves share an angle
    cos, sin = angles.cos(), angles.sin()
    rot = x[..., :n].to(work)
    half = n // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = (rot * cos + rotated_half * sin).to(x.dtype)
    return out if n == d else torch.cat((out, x[..., n:]), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# ALiBi
# ---------------------------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Per-head ALiBi slopes as in the paper (and its reference code), ``[H]``.

    For ``H`` a power of two the slopes are the geometric sequence ``2^(-8/H), 2^(-16/H), ..., 2^-8``. Otherwise
    take the ``2^k`` slopes of the largest power of two below ``H`` and fill up with every other slope of the
    ``2^(k+1)`` sequence, so the slopes still cover the same range.
    """
    check_positive_int("num_heads", num_heads)

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(closest)
    if closest != num_heads:
        slopes += geometric(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, device=device, dtype=dtype)


class ALiBi(ScoreBias):
    """ALiBi as a score bias: ``bias[h, i, j] = -m_h * dist(i, j)``.

    Query ``i`` sits at key position ``i + Tk - Tq`` (bottom-right alignment, as the causal mask, so a decode step
    with ``Tq = 1`` is the last row of the full matrix). ``dist`` is ``pos_q - j`` for the causal variant (keys in the
    future get distance 0; a causal mask removes them anyway) and ``|pos_q - j|`` for the bidirectional one.

    Args:
        num_heads: H, or pass ``slopes`` directly.
        causal: causal (one-sided) or bidirectional (symmetric) distance.
        slopes: optional custom ``[H]`` slopes, e.g. learned or from a checkpoint.

    Raises:
        ValueError: slopes of the wrong shape, or neither/both of ``num_heads`` and ``slopes``.
    """

    def __init__(self, num_heads: int | None = None, *, causal: bool = True, slopes: torch.Tensor | None = None):
        if slopes is None:
            if num_heads is None:
                raise ValueError("num_heads: expected an int when slopes is not given, received None")
            slopes = alibi_slopes(num_heads)
        else:
            check_tensor("slopes", slopes, ndim=1)
            if num_heads is not None and slopes.numel() != num_heads:
                raise ValueError(f"slopes: expected shape [{num_heads}], received {tuple(slopes.shape)}")
        self.slopes = slopes
        self.num_heads = slopes.numel()
        self.causal = bool(causal)

    def _distance(self, q_len: int, kv_len: int, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        rel = (q_idx + (kv_len - q_len)).unsqueeze(-1) - kv_idx.unsqueeze(-2)
        return rel.clamp(min=0) if self.causal else rel.abs()

    def block(self, q_len, kv_len, q_idx, kv_idx, *, dtype=torch.float32):
        dist = self._distance(q_len, kv_len, q_idx, kv_idx).to(dtype)  # [tq, tk]
        slopes = self.slopes.to(device=dist.device, dtype=dtype).view(1, -1, 1, 1)
        return -slopes * dist.unsqueeze(0).unsqueeze(0)  # [1, H, tq, tk]

    def score_mod(self, q_len, kv_len):
        slopes, offset, causal = self.slopes, kv_len - q_len, self.causal

        def mod(score, b, h, q, k):
            rel = q + offset - k
            dist = rel.clamp(min=0) if causal else rel.abs()
            return score - slopes.to(score.device, score.dtype)[h] * dist.to(score.dtype)

        return mod

    def __repr__(self):
        return f"ALiBi(num_heads={self.num_heads}, causal={self.causal})"
