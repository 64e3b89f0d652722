"""hybridattn: attention mechanisms and hybrid (linear + softmax) transformer models.

Tensors are ``[B, T, H, D]`` (batch, time, heads, head dim) throughout, as in flash-attn and fla.

``hybridattn.ModelConfig`` and ``hybridattn.HybridLM`` are imported on first use, so ``import hybridattn``
stays quick.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "hybridattn.models.config",
    "HybridLM": "hybridattn.models.hybrid_lm",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hybridattn' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
