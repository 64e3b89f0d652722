"""Linformer attention (Wang et al. 2020): keys and values projected to a fixed length along the sequence.

    k' = E k,   v' = F v          (E, F: [Kp, Tk], applied along time, per key-value head if 3-D)
    o  = softmax(scale * q k'^T) v'

Cost ``O(Tq * Kp)`` instead of ``O(Tq * Tk)``. Projecting along time mixes future tokens into every key, so the
mechanism is bidirectional only; ``causal=True`` is rejected rather than silently leaking the future.

Shape legend: B batch, Tq / Tk query / key length, H query heads, Hkv key-value heads, D head dim, Dv value head
dim, Kp projected length.
"""

from __future__ import annotations


import torch
import torch.nn.functional as nnf

from hybridattn.ops._checks import check_qkv, check_same, check_scale, check_tensor

__all__ = ["linformer_attention", "linformer_reference"]


def _check_projection(name: str, p, ref: torch.Tensor, kv_len: int, kv_heads: int) -> torch.Tensor:
    check_tensor(name, p)
    check_same(name, "q", p, ref)
    if p.dim() not in (2, 3) or p.shape[-1] != kv_len or (p.dim() == 3 and p.shape[0] != kv_heads):
        raise ValueError(f"{name}: expected [Kp, Tk={kv_len}] or [Hkv={kv_heads}, Kp, Tk={kv_len}], "
                         f"received shape {tuple(p.shape)}")
    return p


def _project(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``p`` along time: ``[B, Tk, Hkv, D] -> [B, Kp, Hkv, D]``."""
    if p.dim() == 2:
        return torch.einsum("pt,bthd->bphd", p, x)
    return torch.einsum("hpt,bthd->bphd", p, x)


def _checked(q, k, v, E, F, causal):
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, received {type(causal).__name__}")
    if causal:
        raise ValueError("causal: Linformer projects keys and values along the whole sequence, so every query would "
                         "see future tokens; expected causal=False, received causal=True")
    b, tq, h, d, tk, hkv, dv = check_qkv(q, k, v)
    _check_projection("E", E, q, tk, hkv)
    _check_projection("F", F, q, tk, hkv)
    if E.shape[-2] != F.shape[-2]:
        raise ValueError(f"F: expected the projected length Kp={E.shape[-2]} of E, received {F.shape[-2]}")
    return d


def linformer_attention(q, k, v, E, F, *, causal: bool = False, scale: float | None = None):
    """Softmax attention over keys / values projected along the sequence to ``Kp`` positions.

    Args:
        q: queries ``[B, Tq, H, D]``.
        k: keys ``[B, Tk, Hkv, D]`` (``H % Hkv == 0``).
        v: values ``[B, Tk, Hkv, Dv]``.
        E: key projection ``[Kp, Tk]`` (shared) or ``[Hkv, Kp, Tk]`` (per head).
        F: value projection, same shape as ``E`` (the paper's ``F``).
        causal: must be False (see module docstring).
        scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
        ``o`` ``[B, Tq, H, Dv]``.

    Raises:
        ValueError: ``causal=True``, projections of the wrong shape, mismatched q / k / v.
        TypeError: non-tensor or non-floating inputs, mismatched dtypes.
    """
    d = _checked(q, k, v, E, F, causal)
    scale = check_scale(scale, d)
    kp, vp = _project(E, k), _project(F, v)  # (B, Kp, Hkv, D)
    o = nnf.scaled_dot_product_attention(q.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), scale=scale,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def linformer_reference(q, k, v, E, F, *, scale: float | None = None):
    """Float64 reference: project, then the plain softmax formula with repeated key-value heads."""
    d = _checked(q, k, v, E, F, False)
    scale = check_scale(scale, d)
    g = q.shape[2] // k.shape[2]
    kp = _project(E.double(), k.double()).repeat_interleave(g, dim=2)
    vp = _project(F.double(), v.double()).repeat_interleave(g, dim=2)
    w = torch.softmax(scale * torch.einsum("bthd,bphd->bhtp", q.double(), kp), dim=-1)
    return torch.einsum("bhtp,bphd->bthd", w, vp)
