"""Feed-forward layers of a transformer block and the small factory the block builds them from.

- ``SwiGLU``: ``down(silu(gate(x)) * up(x))`` (LLaMA, Qwen); parameter names as in transformers
  (``gate_proj``, ``up_proj``, ``down_proj``). One class serves dense layers and MoE experts; it lives in
  ``layers.moe`` and is re-exported here.
- ``GeluMLP``: ``down(gelu(up(x)))`` (GPT-2).

Other feed-forward layers (e.g. a mixture of experts) plug in with ``register_ffn(name)``; the block asks
``build_ffn(config, layer_idx)`` for its layer and never names a class itself.

Shape legend: B batch, T time, d model width, F hidden width.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridattn.layers.moe import MoEFeedForward, SwiGLU
from hybridattn.ops._checks import check_positive_int

__all__ = ["SwiGLU", "GeluMLP", "register_ffn", "build_ffn", "available_ffns"]


class GeluMLP(nn.Module):
    """Plain feed-forward ``down(gelu(up(x)))`` (tanh approximation, as GPT-2): ``[B, T, d] -> [B, T, d]``."""

    def __init__(self, d_model: int, hidden: int, *, bias: bool = True):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("hidden", hidden)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


FFNFactory = Callable[[object, int], nn.Module]
_FFN: dict[str, FFNFactory] = {}


def register_ffn(name: str, *, overwrite: bool = False):
    """Decorator registering ``factory(config, layer_idx) -> nn.Module`` as feed-forward kind ``name``."""

    def decorator(factory: FFNFactory) -> FFNFactory:
        if name in _FFN and not overwrite and _FFN[name] is not factory:
            raise ValueError(f"name: feed-forward {name!r} is already registered; pass overwrite=True to replace it")
        _FFN[name] = factory
        return factory

    return decorator


def available_ffns() -> list[str]:
    return sorted(_FFN)


def build_ffn(name: str, config, layer_idx: int) -> nn.Module:
    """Build the feed-forward layer ``name`` for layer ``layer_idx`` of a ``ModelConfig``."""
    if name not in _FFN:
        raise ValueError(f"ffn.kind: expected one of {tuple(sorted(_FFN))}, received {name!r}")
    return _FFN[name](config, layer_idx)


@register_ffn("swiglu")
def _build_swiglu(config, layer_idx: int) -> nn.Module:
    return SwiGLU(config.d_model, config.ffn.hidden(config.d_model))


@register_ffn("gelu")
def _build_gelu(config, layer_idx: int) -> nn.Module:
    return GeluMLP(config.d_model, config.ffn.hidden(config.d_model), bias=config.ffn.bias)


@register_ffn("moe")
def _build_moe(config, layer_idx: int) -> nn.Module:
    moe = config.moe
    return MoEFeedForward(
        config.d_model, num_experts=moe.num_experts, top_k=moe.num_experts_per_tok,
        expert_hidden=moe.moe_intermediate_size, shared_expert_hidden=moe.shared_expert_intermediate_size,
        norm_topk_prob=moe.norm_topk_prob,
    )
