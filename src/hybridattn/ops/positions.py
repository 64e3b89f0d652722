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

import inspect
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
    return _plain_inv_freq(n, theta, device, dtype)


def apply_rotary(
    x: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0, rotary_fraction: float = 1.0,
    scaling: dict | None = None,
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of every head by its token's position (rotate_half layout).

    Args:
        x: ``[B, T, H, D]`` queries or keys.
        positions: integer ``[T]`` (shared by the batch) or ``[B, T]`` (per row, e.g. after left padding or with
            a cache offset).
        theta: RoPE base.
        rotary_fraction: share of ``D`` that is rotated; the rest passes through unchanged.
        scaling: a RoPE scaling dict (``{"rope_type": "yarn", ...}``, see ``ROPE_SCALING``), validated beforehand
            with :func:`check_rope_scaling`; None = plain RoPE. ``dynamic`` and ``longrope`` depend on the largest
            position in ``positions`` (+ 1), computed on the device without a sync.

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
    needs_length = scaling is not None and scaling.get("rope_type") in ("dynamic", "longrope")
    seq_len = positions.max() + 1 if needs_length else None
    inv_freq, scale = rope_scaled_frequencies(d, theta=theta, rotary_fraction=rotary_fraction, scaling=scaling,
                                              seq_len=seq_len, device=x.device, dtype=work)
    n = 2 * inv_freq.numel()
    angles = positions.to(work).unsqueeze(-1) * inv_freq  # [1|B, T, n/2]
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # [1|B, T, 1, n]: both halves share an angle
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:  # YaRN / LongRoPE temperature: scales the rotated channels only, as Hugging Face does
        cos, sin = cos * scale, sin * scale
    rot = x[..., :n].to(work)
    half = n // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = (rot * cos + rotated_half * sin).to(x.dtype)
    return out if n == d else torch.cat((out, x[..., n:]), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# RoPE scaling (context extension): each function gives the inverse frequencies of the ``dim`` rotated channels and
# the factor that multiplies cos and sin (the rotated channels only), as ``(inv_freq [dim / 2], attention_scale)``.
# ``w_i = theta^(-2i / dim)`` are the plain RoPE frequencies, ``L0`` the pre-training context length. The semantics
# follow Hugging Face's ``modeling_rope_utils`` (which the tests compare against), parameter names included.
# ---------------------------------------------------------------------------------------------------------------


def _plain_inv_freq(dim: int, theta: float, device, dtype) -> torch.Tensor:
    return theta ** (-torch.arange(0, dim, 2, device=device, dtype=dtype) / dim)


def rope_linear(dim: int, *, theta: float, factor: float, device=None, dtype=torch.float32):
    """Position interpolation (kaiokendev; Chen et al., 2023): ``w_i / factor``, i.e. positions divided by
    ``factor``; attention scale 1."""
    return _plain_inv_freq(dim, theta, device, dtype) / factor, 1.0


def rope_dynamic(dim: int, *, theta: float, factor: float, original_max_position_embeddings: int, seq_len=None,
                 device=None, dtype=torch.float32):
    """Dynamic NTK scaling (bloc97, emozilla): a larger base once the sequence outgrows ``L0``,

    ``theta' = theta * (factor * L / L0 - (factor - 1)) ^ (dim / (dim - 2))``, ``L = max(seq_len, L0)``, then
    ``w'_i = theta'^(-2i / dim)``; attention scale 1. ``seq_len`` is the length seen so far (largest position + 1:
    a Python int or a 0-dim tensor, which avoids a device sync); None means ``L0`` (plain RoPE). Keys already in a
    KV cache keep the rotation they were stored with, as in Hugging Face.
    """
    if dim <= 2:
        raise ValueError(f"dim: dynamic NTK scaling needs more than 2 rotated channels, received {dim}")
    l0 = original_max_position_embeddings
    if isinstance(seq_len, torch.Tensor):
        length = seq_len.to(device=device, dtype=dtype).clamp(min=l0)
    else:
        length = float(max(l0 if seq_len is None else seq_len, l0))
    base = theta * (factor * length / l0 - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, device=device, dtype=dtype) / dim
    return base ** -exponents, 1.0


def yarn_attention_scale(factor: float, *, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """YaRN's attention temperature ``m(s) = 0.1 * mscale * ln(s) + 1`` (1 for ``s <= 1``): ``m(factor)`` with
    ``mscale = 1``, or ``m(factor; mscale) / m(factor; mscale_all_dim)`` when both are given (DeepSeek)."""

    def m(scale: float, k: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return m(factor, mscale) / m(factor, mscale_all_dim)
    return m(factor)


def rope_yarn(dim: int, *, theta: float, factor: float, original_max_position_embeddings: int,
              beta_fast: float | None = 32.0, beta_slow: float | None = 1.0, attention_factor: float | None = None,
              mscale: float | None = None, mscale_all_dim: float | None = None, truncate: bool = True,
              device=None, dtype=torch.float32):
    """YaRN (Peng et al., 2023): interpolate the slow channels, keep the fast ones, ramp between them,

    ``w'_i = (w_i / factor) * r_i + w_i * (1 - r_i)``, ``r_i = clamp((i - lo) / (hi - lo), 0, 1)`` for channel pair
    ``i``, where ``lo``/``hi`` are the pairs that turn ``beta_fast``/``beta_slow`` times over ``L0``:
    ``d(b) = dim * ln(L0 / (2 pi b)) / (2 ln theta)``, ``lo = max(d(beta_fast), 0)``,
    ``hi = min(d(beta_slow), dim - 1)`` (``floor``/``ceil`` first when ``truncate``; ``hi += 0.001`` if equal).
    Attention scale: ``attention_factor``, else :func:`yarn_attention_scale`. ``beta_* = None`` means 32 / 1.
    """
    beta_fast, beta_slow = beta_fast or 32.0, beta_slow or 1.0

    def pair(rotations: float) -> float:
        return dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = pair(beta_fast), pair(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # avoid 0 / 0
    ramp = ((torch.arange(dim // 2, device=device, dtype=dtype) - lo) / (hi - lo)).clamp(0, 1)
    inv_freq = _plain_inv_freq(dim, theta, device, dtype)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if attention_factor is None:
        attention_factor = yarn_attention_scale(factor, mscale=mscale, mscale_all_dim=mscale_all_dim)
    return inv_freq, float(attention_factor)


def rope_llama3(dim: int, *, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                original_max_position_embeddings: int, device=None, dtype=torch.float32):
    """Llama 3.1 scaling: by wavelength ``lambda_i = 2 pi / w_i``, keep ``w_i`` where ``lambda_i < L0 /
    high_freq_factor``, use ``w_i / factor`` where ``lambda_i > L0 / low_freq_factor``, and in between
    ``(1 - s) w_i / factor + s w_i`` with ``s = (L0 / lambda_i - low_freq_factor) / (high_freq_factor -
    low_freq_factor)``; attention scale 1."""
    l0 = original_max_position_embeddings
    inv_freq = _plain_inv_freq(dim, theta, device, dtype)
    wavelen = 2 * math.pi / inv_freq
    smooth = (l0 / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    out = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > l0 / low_freq_factor, inv_freq / factor, out)
    return torch.where(wavelen < l0 / high_freq_factor, inv_freq, out), 1.0


def rope_longrope(dim: int, *, theta: float, short_factor, long_factor, factor: float,
                  original_max_position_embeddings: int, attention_factor: float | None = None, seq_len=None,
                  device=None, dtype=torch.float32):
    """LongRoPE (Ding et al., 2024; Phi-3): per-channel rescaling ``w_i / e_i`` with ``e = long_factor`` once the
    sequence is longer than ``L0`` (``seq_len > L0``; an int or a 0-dim tensor) and ``e = short_factor`` otherwise.
    Attention scale: ``attention_factor``, else ``sqrt(1 + ln(factor) / ln(L0))`` (1 for ``factor <= 1``)."""
    inv_freq = _plain_inv_freq(dim, theta, device, dtype)
    short = inv_freq / torch.tensor(short_factor, device=device, dtype=dtype)
    long = inv_freq / torch.tensor(long_factor, device=device, dtype=dtype)
    l0 = original_max_position_embeddings
    if isinstance(seq_len, torch.Tensor):
        inv_freq = torch.where(seq_len.to(device) > l0, long, short)
    else:
        inv_freq = long if seq_len is not None and seq_len > l0 else short
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(l0))
    return inv_freq, float(attention_factor)


#: ``rope_type`` -> frequency function; a scaling dict's other keys are that function's keyword arguments.
ROPE_SCALING = {"linear": rope_linear, "dynamic": rope_dynamic, "yarn": rope_yarn, "llama3": rope_llama3,
                "longrope": rope_longrope}
_NOT_CONFIG = {"dim", "theta", "seq_len", "device", "dtype"}


def rope_scaling_fields(rope_type: str) -> tuple[set, set]:
    """``(required, optional)`` parameter names of a scaling type: its function's keyword arguments."""
    params = inspect.signature(ROPE_SCALING[rope_type]).parameters.values()
    required = {p.name for p in params if p.default is p.empty and p.name not in _NOT_CONFIG}
    optional = {p.name for p in params if p.default is not p.empty and p.name not in _NOT_CONFIG}
    return required, optional


def check_rope_scaling(scaling, *, name: str = "rope_scaling", rotary_dim: int | None = None) -> dict | None:
    """Validate a RoPE scaling dict ``{"rope_type": ..., <that type's parameters>}`` (None = plain RoPE).

    Returns a copy (None for None or ``{"rope_type": "default"}``).

    Raises:
        TypeError: not a dict, or a parameter of the wrong type.
        ValueError: an unknown ``rope_type``, missing or unknown parameters, factors that are not positive, or
            ``short_factor``/``long_factor`` lists whose length is not ``rotary_dim / 2`` (when given).
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"{name}: expected None or a dict with a 'rope_type', received {type(scaling).__name__}")
    rope_type = scaling.get("rope_type")
    if rope_type == "default" and len(scaling) == 1:
        return None
    if rope_type not in ROPE_SCALING:
        raise ValueError(f"{name}.rope_type: expected one of {tuple(ROPE_SCALING)}, received {rope_type!r}")
    required, optional = rope_scaling_fields(rope_type)
    given = set(scaling) - {"rope_type"}
    if required - given or given - required - optional:
        raise ValueError(f"{name}: rope_type {rope_type!r} expects {sorted(required)} and optionally "
                         f"{sorted(optional)}, received {sorted(given)}")
    for key, value in scaling.items():
        if key == "rope_type" or (value is None and key in optional):
            continue
        if key in ("short_factor", "long_factor"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and v > 0 for v in value):
                raise TypeError(f"{name}.{key}: expected a list of positive numbers, received {value!r}")
            if rotary_dim is not None and len(value) != rotary_dim // 2:
                raise ValueError(f"{name}.{key}: expected {rotary_dim // 2} entries (rotary_dim / 2), "
                                 f"received {len(value)}")
        elif key == "truncate":
            if not isinstance(value, bool):
                raise TypeError(f"{name}.truncate: expected a bool, received {value!r}")
        elif key == "original_max_position_embeddings":
            check_positive_int(f"{name}.{key}", value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name}.{key}: expected a positive number, received {value!r}")
    return dict(scaling)


def rope_scaled_frequencies(head_dim: int, *, theta: float = 10000.0, rotary_fraction: float = 1.0, scaling=None,
                            seq_len=None, device=None, dtype=torch.float32) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rotary_dim / 2]`` and the cos/sin scale of RoPE with an optional ``scaling`` dict
    (see ``ROPE_SCALING``; validate it once with :func:`check_rope_scaling`). ``seq_len`` (the length seen so far)
    matters for ``dynamic`` and ``longrope`` only.

    Raises:
        ValueError: an unknown ``rope_type`` or a bad rotary width.
    """
    inv_freq = rope_frequencies(head_dim, theta=theta, rotary_fraction=rotary_fraction, device=device, dtype=dtype)
    if scaling is None:
        return inv_freq, 1.0
    params = {k: v for k, v in scaling.items() if k != "rope_type"}
    fn = ROPE_SCALING.get(scaling.get("rope_type"))
    if fn is None:
        raise ValueError(f"scaling.rope_type: expected one of {tuple(ROPE_SCALING)}, "
                         f"received {scaling.get('rope_type')!r}")
    if fn in (rope_dynamic, rope_longrope):
        params["seq_len"] = seq_len
    return fn(2 * inv_freq.numel(), theta=theta, device=device, dtype=dtype, **params)


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
