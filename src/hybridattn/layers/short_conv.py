"""Depthwise causal short convolution with a carried tail (the "short conv" of Mamba, GLA, Gated DeltaNet).

Each channel ``c`` is filtered on its own over the last ``K`` inputs::

    y[t, c] = act( sum_{i < K} w[c, i] * x[t - K + 1 + i, c] )

Between calls (incremental decoding) the module carries the last ``K - 1`` real inputs of every row, the
*tail* ``[B, K - 1, C]``. Left padding (``token_mask`` False) is skipped: a padded token is neither an input
of any real token's window nor part of the new tail, so a padded row gives the same numbers as the row alone.

Shape legend: B batch, T time, C channels, K kernel size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridattn.layers.cache import check_token_mask
from hybridattn.ops._checks import check_shape, check_tensor

ACTIVATIONS = {"silu": F.silu, "identity": lambda x: x}


def check_left_padding(token_mask, batch: int, length: int, device) -> torch.Tensor | None:
    """Validate a left-padding mask ``[B, T]`` (bool, True = real token, False only before a row's first real
    token). Returns None when every token is real, so callers can take the unpadded path."""
    token_mask = check_token_mask(token_mask, batch, length, device)
    if token_mask is None:
        return None
    if length > 1 and bool((token_mask[:, 1:] < token_mask[:, :-1]).any()):
        raise ValueError("token_mask: expected left padding (False only before the first True of each row), "
                         "received a row with False after True")
    return None if bool(token_mask.all()) else token_mask


class ShortConvolution(nn.Conv1d):
    """Depthwise causal ``Conv1d`` (weight ``[C, 1, K]``, as ``nn.Conv1d(C, C, K, groups=C)``) with a tail.

    Args:
        channels: number of channels C.
        kernel_size: K (Qwen3-Next and fla use 4).
        activation: ``"silu"`` or ``"identity"``.
        bias: add a per-channel bias.
    """

    def __init__(self, channels: int, kernel_size: int = 4, *, activation: str = "silu", bias: bool = False):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias, padding=0)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS)}, received {activation!r}")
        self.activation = activation

    def new_tail(self, batch_size: int, *, device=None, dtype=None) -> torch.Tensor:
        """A zero tail ``[B, K - 1, C]`` (what a fresh sequence sees before its first token)."""
        return torch.zeros(
            batch_size, self.kernel_size[0] - 1, self.in_channels,
            device=self.weight.device if device is None else device,
            dtype=self.weight.dtype if dtype is None else dtype,
        )

    def forward(self, x: torch.Tensor, *, tail: torch.Tensor | None = None, token_mask=None):
        """Filter ``x`` ``[B, T, C]``.

        Args:
            x: inputs ``[B, T, C]``.
            tail: the last ``K - 1`` inputs of earlier calls ``[B, K - 1, C]``; zeros when None.
            token_mask: bool ``[B, T]``, False on left padding (already validated by the mixer).

        Returns:
            ``(y, new_tail)``: outputs ``[B, T, C]`` (zeros at padded positions) and the tail to carry.
        """
        check_tensor("x", x, ndim=3)
        b, t, c = x.shape
        k = self.kernel_size[0]
        if c != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels in [B, T, C], received shape {tuple(x.shape)}")
        if tail is None:
            tail = self.new_tail(b, device=x.device, dtype=x.dtype)
        check_shape("tail", tail, (b, k - 1, c))
        full = torch.cat([tail.to(x.dtype), x], dim=1)  # (B, K-1+T, C)
        if token_mask is not None:
            # Move the tail so that it sits just before each row's first real token; padded slots become 0.
            pads = (~token_mask).sum(dim=1, keepdim=True)  # (B, 1)
            j = torch.arange(k - 1 + t, device=x.device).unsqueeze(0)  # (1, K-1+T)
            src = torch.where(j >= k - 1 + pads, j, j - pads)
            keep = (j >= pads).unsqueeze(-1)
            full = torch.gather(full, 1, src.clamp(min=0).unsqueeze(-1).expand(b, -1, c)) * keep
        if t == 1:
            # one decoding step: a dot product per channel; F.conv1d's setup costs far more than the arithmetic
            y = torch.einsum("bkc,ck->bc", full, self.weight[:, 0]).unsqueeze(1)
            y = y if self.bias is None else y + self.bias
        else:
            # K shifted multiply-adds in the [B, T, C] layout: F.conv1d wants [B, C, T] and the two transposes
            # around it cost more than the convolution (2x slower at T = 2048, C = 1024 on a CPU).
            # Accumulated in at least float32, as F.conv1d does, so that half precision rounds once, not K times.
            work = torch.promote_types(x.dtype, torch.float32)
            src, w = full.to(work), self.weight[:, 0].t().to(work)  # (B, K-1+T, C), (K, C)
            y = src[:, k - 1:] * w[k - 1] if self.bias is None else torch.addcmul(self.bias.to(work), src[:, k - 1:],
                                                                                   w[k - 1])
            for i in range(k - 1):
                y = y.addcmul_(src[:, i : i + t], w[i])
            y = y.to(x.dtype)
        y = ACTIVATIONS[self.activation](y)
        if token_mask is not None:
            y = y * token_mask.unsqueeze(-1)
        new_tail = full[:, full.shape[1] - (k - 1):]
        return y, new_tail
