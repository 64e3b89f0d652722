"""The ``flex`` backend of ``softmax_attention``: torch FlexAttention compiled with ``torch.compile``.

Masks reach it as ``MaskSpec.mask_mod`` (turned into a ``BlockMask``, so empty blocks are skipped by the
kernel), biases as ``ScoreBias.score_mod``, the softcap as a ``score_mod`` applied first, matching the order of
the other backends. FlexAttention has no backward pass on the CPU, so there it serves inference only and
``auto`` never picks it.

Shape legend: B batch, Tq / Tk query / key length, Hq / Hkv heads, D, Dv head dims.
"""

from __future__ import annotations

import functools

import torch

from hybridattn.ops.masks import MaskSpec
from hybridattn.ops.scores import ScoreBias

__all__ = ["flex_attention_backend"]

RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:  # pragma: no cover - torch < 2.5
        raise RuntimeError("backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)") from err
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def _score_mod(bias: ScoreBias | None, softcap: float | None, tq: int, tk: int):
    if bias is None and softcap is None:
        return None
    bias_mod = None if bias is None else bias.score_mod(tq, tk)

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if bias_mod is not None:
            score = bias_mod(score, b, h, q_idx, kv_idx)
        return score

    return score_mod


def flex_attention_backend(q, k, v, *, mask: MaskSpec | None, bias: ScoreBias | None, scale: float,
                           softcap: float | None):
    """FlexAttention on validated arguments (use ``softmax_attention(..., backend="flex")``).

    Args:
        q, k, v: ``[B, Tq, Hq, D]``, ``[B, Tk, Hkv, D]``, ``[B, Tk, Hkv, Dv]``, already validated.
        mask, bias, scale, softcap: as normalised by ``softmax_attention``.

    Returns:
        ``o`` ``[B, Tq, Hq, Dv]`` in q's dtype.

    Raises:
        ValueError: gradients are requested on the CPU, where FlexAttention has no backward pass.
        RuntimeError: FlexAttention or ``torch.compile`` is unavailable on this machine.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and q.device.type == "cpu":
        raise ValueError(
            "backend: 'flex' is inference-only on the CPU (FlexAttention has no CPU backward); received inputs that "
            "require grad. Use backend='tiled' or 'auto', or run under torch.no_grad()"
        )
    if not needs_grad:
        # torch's flex_attention rejects CPU inputs with requires_grad even under no_grad(); nothing will
        # differentiate through this call, so detached views are equivalent
        q, k, v = q.detach(), k.detach(), v.detach()
    flex, create_block_mask = _compiled_flex()
    tq, tk = q.shape[1], k.shape[1]
    block_mask = None
    if mask is not None:
        block_mask = create_block_mask(mask.mask_mod(tq, tk), mask.batch_size, mask.num_heads, tq, tk,
                                       device=q.device)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    try:
        # Every distinct mask_mod / score_mod is traced into its own kernel; past dynamo's default of 8 recompiles
        # FlexAttention would silently fall back to an eager version that materialises Tq x Tk.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            o = flex(qh, kh, vh, score_mod=_score_mod(bias, softcap, tq, tk), block_mask=block_mask, scale=scale,
                     enable_gqa=q.shape[2] != k.shape[2])
    except Exception as err:  # torch.compile raises backend-specific types; all mean "cannot run here"
        raise RuntimeError(
            f"backend='flex': torch.compile could not build FlexAttention on this machine "
            f"({type(err).__name__}: {str(err)[:200]}). Use backend='tiled' or 'sdpa'"
        ) from err
    return o.transpose(1, 2)
