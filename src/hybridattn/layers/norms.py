"""RMS normalisations: plain, zero-centred (Qwen3-Next) and gated (the Gated DeltaNet output norm).

``rms(x) = x / sqrt(mean(x^2) + eps)`` over the last dimension, always computed in float32 (or float64 for float64
inputs) and cast back to the input dtype at the end, because the mean of squares overflows or loses all precision
in fp16 / bf16.

- :class:`RMSNorm`: ``rms(x) * w`` (weight initialised to ones), or with ``zero_centered=True``
  ``rms(x) * (1 + w)`` (weight initialised to zeros, so weight decay pulls towards the identity scale; Qwen3-Next).
- :class:`GatedRMSNorm`: ``rms(o) * w * silu(z)``, the output norm of Gated DeltaNet / Qwen3-Next linear layers.

Shape legend: ``[..., D]`` any leading dimensions, D the normalised width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridattn.ops._checks import check_positive_int, check_tensor


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float = 1e-6, zero_centered: bool = False):
    """Functional RMSNorm over the last dimension.

    Args:
        x: ``[..., D]``.
        weight: ``[D]`` scale, or None for no scale.
        eps: added to the mean of squares.
        zero_centered: scale by ``1 + weight`` instead of ``weight``.

    Returns:
        ``[..., D]`` in the dtype of ``x``.

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: ``weight`` does not have shape ``[D]``.
    """
    check_tensor("x", x)
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight: expected shape ({x.shape[-1]},) (the last dim of x), received {tuple(weight.shape)}")
    if x.dtype in (torch.float32, torch.float64) and (weight is None or weight.dtype == x.dtype):
        # torch's fused kernel, same formula: half the time of the five ops below at decode sizes
        w = None if weight is None else (1.0 + weight if zero_centered else weight)
        return F.rms_norm(x, (x.shape[-1],), w, eps=eps)
    work = _work_dtype(x.dtype)
    h = x.to(work)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        w = weight.to(work)
        h = h * (1.0 + w if zero_centered else w)
    return h.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, optionally zero-centred (``rms(x) * (1 + w)``, weight starts at zero).

    Args:
        dim: normalised width D.
        eps: added to the mean of squares.
        zero_centered: use the Qwen3-Next parametrisation.

    Raises:
        ValueError / TypeError: non-positive ``dim``; wrong last dimension of the input.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, zero_centered: bool = False):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.eps = eps
        self.zero_centered = bool(zero_centered)
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim("x", x, self.dim)
        return rms_norm(x, self.weight, eps=self.eps, zero_centered=self.zero_centered)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, zero_centered={self.zero_centered}"


class GatedRMSNorm(nn.Module):
    """``rms(o) * w * silu(z)``: normalise the mixer output, then gate it with a second projection of the input.

    Args:
        dim: normalised width D (per head when applied to ``[B, T, H, D]``).
        eps: added to the mean of squares.

    Forward args:
        o: ``[..., D]`` output to normalise.
        z: ``[..., D]`` gate, same shape as ``o``.

    Raises:
        ValueError: ``o`` and ``z`` differ in shape, or the last dimension is not D.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        _check_last_dim("o", o, self.dim)
        check_tensor("z", z)
        if z.shape != o.shape:
            raise ValueError(f"z: expected shape {tuple(o.shape)} (the shape of o), received {tuple(z.shape)}")
        work = _work_dtype(o.dtype)
        # the gate is applied in the same wide dtype as the norm and only the product is rounded, once
        h = rms_norm(o.to(work), self.weight, eps=self.eps) * F.silu(z.to(work))
        return h.to(o.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def _check_last_dim(name: str, x, dim: int) -> None:
    check_tensor(name, x)
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"{name}: expected last dimension {dim}, received shape {tuple(x.shape)}")
