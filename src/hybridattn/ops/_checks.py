"""Input validation shared by every op.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument and states the
expected and the received value, so that a user sees what to change without reading our source.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


def check_tensor(name: str, x, *, ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    """Check that ``x`` is a tensor, optionally with ``ndim`` dimensions and a floating dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, received {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, received shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, received {x.dtype}")
    return x


def check_bthd(name: str, x) -> tuple[int, int, int, int]:
    """Check a ``[B, T, H, D]`` tensor and return its sizes."""
    check_tensor(name, x, ndim=4)
    b, t, h, d = x.shape
    if h == 0 or d == 0:
        raise ValueError(f"{name}: expected [B, T, H, D] with H > 0 and D > 0, received shape {tuple(x.shape)}")
    return b, t, h, d


def check_same(name: str, ref_name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    """Check that ``x`` has the same dtype and device as ``ref``."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), received {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), received {x.device}")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int]) -> None:
    """Check an exact shape."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, received {tuple(x.shape)}")


def check_heads_divisible(name: str, heads: int, ref_name: str, ref_heads: int) -> None:
    """Check GQA/GVA head counts: ``heads`` must be a multiple of ``ref_heads``."""
    if ref_heads == 0 or heads % ref_heads != 0:
        raise ValueError(
            f"{name}: expected a head count divisible by the {ref_heads} heads of {ref_name}, received {heads}"
        )


def check_qkv(q, k, v) -> tuple[int, int, int, int, int, int, int]:
    """Check attention inputs ``q [B, Tq, Hq, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]`` (same dtype and
    device, ``Hq % Hkv == 0``) and return ``(B, Tq, Hq, D, Tk, Hkv, Dv)``."""
    b, tq, hq, d = check_bthd("q", q)
    bk, tk, hkv, dk = check_bthd("k", k)
    bv, tv, hv, dv = check_bthd("v", v)
    check_same("k", "q", k, q)
    check_same("v", "q", v, q)
    if (bk, dk) != (b, d):
        raise ValueError(f"k: expected [B={b}, Tk, Hkv, D={d}] to match q, received shape {tuple(k.shape)}")
    if (bv, tv, hv) != (b, tk, hkv):
        raise ValueError(f"v: expected [B={b}, Tk={tk}, Hkv={hkv}, Dv] to match k, received shape {tuple(v.shape)}")
    check_heads_divisible("q", hq, "k", hkv)
    return b, tq, hq, d, tk, hkv, dv


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, received {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected an int {bound}, received {value}")
    return value


def check_number(name: str, value, *, positive: bool = False) -> float:
    """Check a finite real number (``bool`` rejected) and return it as a float; ``positive``: also ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, received {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name}: expected a finite float{' > 0' if positive else ''}, received {value}")
    return value


def check_scale(scale, head_dim: int) -> float:
    """The attention logit scale: ``1 / sqrt(head_dim)`` for ``None``, else a finite float (any sign)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else check_number("scale", scale)


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, received {value!r}")


INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_cu_seqlens(cu_seqlens, total: int, *, batch: int, device=None) -> torch.Tensor:
    """Check flash-attn style ``cu_seqlens``: int tensor ``[N+1]``, starts at 0, non-decreasing, ends at
    ``total``; packed inputs must have batch size 1; on ``device`` (the inputs') when given."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected a torch.Tensor, received {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected shape [N + 1] with N >= 1, received {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in INTEGER_DTYPES:
        raise TypeError(f"cu_seqlens: expected an integer dtype (int32 or int64), received {cu_seqlens.dtype}")
    if device is not None and cu_seqlens.device != torch.device(device):
        raise ValueError(f"cu_seqlens: expected device {device} (the device of q), received {cu_seqlens.device}")
    if batch != 1:
        raise ValueError(f"cu_seqlens: packed sequences expect batch size 1, received batch size {batch}")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total:
        raise ValueError(f"cu_seqlens: expected to start at 0 and end at T={total}, received {first}..{last}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens: expected non-decreasing offsets, received " + str(cu_seqlens.tolist()))
    return cu_seqlens
