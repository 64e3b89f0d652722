"""Qwen3-Next on the CPU: hybridattn vs transformers' PyTorch path, same weights, one run.

    python -m hybridattn.bench.qwen3_next [--seq-len 2048] [--repeats 3] [--decode-tokens 16]

Builds a random transformers ``Qwen3NextForCausalLM`` (hidden 512, 8 layers in Qwen3-Next's 3:1 layout, GVA,
MoE with a shared expert), saves it in the transformers format, loads it into a ``HybridLM`` and times, in fp32:

- prefill: one forward over a ``T``-token prompt that fills the cache and returns the last position's logits;
- decode: per-token latency of greedy steps continuing that cache.

The peer runs without fla / causal-conv1d: transformers chooses those kernels when it imports its modeling file
(``use_kernel_func_from_hub_with_fallback`` imports the package and wraps the found function), and fla cannot run
on a CPU anyway. :func:`transformers_without_fla` rebinds the module-level kernel names to the PyTorch functions
the wrappers keep as ``__wrapped__``; the layers look these names up on every call, so the peer runs exactly its
torch fallback. The benchmark checks that the rebinding took effect before timing.

Targets (ratios of medians in the same run): prefill >= 3x faster, decode >= 1.5x faster per token.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

TORCH_FALLBACKS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                   "causal_conv1d_update")


def transformers_without_fla(setattr_fn=setattr):
    """Import transformers' Qwen3-Next modeling module with its kernels pointed at the PyTorch reference paths.

    Args:
        setattr_fn: how to rebind (``setattr``, or pytest's ``monkeypatch.setattr`` to undo it after a test).

    Returns:
        The ``transformers.models.qwen3_next.modeling_qwen3_next`` module.

    Raises:
        RuntimeError: a kernel name is still bound to something other than the module's own torch function.
    """
    import transformers.models.qwen3_next.modeling_qwen3_next as module

    for name in TORCH_FALLBACKS:
        fn = getattr(module, name)
        setattr_fn(module, name, getattr(fn, "__wrapped__", fn))
        bound = getattr(module, name)
        if bound.__module__ != module.__name__ or hasattr(bound, "__wrapped__"):
            raise RuntimeError(f"{name}: could not restore transformers' torch path (bound to {bound!r})")
    return module


def bench_config(**overrides) -> dict:
    """The benchmark's Qwen3-Next shape: the 80B model's proportions scaled to hidden 512 (head dims 128 / 64,
    twice as many value heads as key heads, 32 experts of which 4 + 1 shared are active)."""
    cfg = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=2, head_dim=64,
               linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
               num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
               shared_expert_intermediate_size=256, initializer_range=0.05)
    cfg.update(overrides)
    return cfg
