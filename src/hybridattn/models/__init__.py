"""Hybrid language models: ``ModelConfig``, ``HybridLM``, generation, checkpoints, memory planning.

Imports are lazy so that ``import hybridattn`` stays quick.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "hybridattn.models.config",
    "HybridLM": "hybridattn.models.hybrid_lm",
    "ModelCache": "hybridattn.models.hybrid_lm",
    "generate": "hybridattn.models.generation",
    "plan": "hybridattn.models.memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hybridattn.models' has no attribute {name!r}")
