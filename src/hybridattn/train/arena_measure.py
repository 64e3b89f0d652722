"""Inference costs of a model for the arena: prefill and per-token decode latency, cache bytes, peak memory.

Measured on a batch of one sequence of random tokens (the costs do not depend on the weights), on the
model's own device, with ``hybridattn.bench.measure`` (medians over repeats; CUDA-synchronised on GPU).

- prefill latency at context ``C``: one forward over ``C`` tokens filling a fresh cache;
- decode latency at context ``C``: the median time of one single-token step after a prefill of ``C``;
- cache bytes at ``C``: ``cache.nbytes()`` after the prefill — KV entries of the softmax layers plus the
  recurrent state and short-conv tail of the linear ones; these are allocated bytes, so a KV cache shorter
  than its initial capacity (64 entries) counts that capacity;
- peak memory: the peak of live bytes during the prefill at the evaluation length.

A model without ``new_cache`` (any plain ``input_ids -> logits`` module) gets prefill latency only; its
decode latency is the cost of re-running the whole context, which is what such a model has to do.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridattn.bench.measure import median_time, peak_memory


def _ids(model: nn.Module, length: int, vocab_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab_size, (1, length), generator=g).to(device)


@torch.no_grad()
def measure_inference(model: nn.Module, *, vocab_size: int, contexts: list[int], eval_len: int,
                      repeats: int = 3, decode_steps: int = 4) -> dict:
    """Latency, cache bytes and peak memory of ``model`` (see module docstring).

    Args:
        model: ``HybridLM`` (with caches) or any ``input_ids -> logits`` module.
        vocab_size: range of the random token ids.
        contexts: context lengths to measure at.
        eval_len: the task's evaluation length, for cache bytes and peak memory.
        repeats: timed repeats per measurement (medians are reported).
        decode_steps: single-token steps timed per repeat after each prefill.

    Returns:
        ``{"contexts": [...], "prefill_s": [...], "decode_s": [...], "cache_bytes": [...],
        "cache_bytes_eval": int | None, "peak_memory_bytes": int, "has_cache": bool}``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    has_cache = hasattr(model, "new_cache")
    out = {"contexts": list(contexts), "prefill_s": [], "decode_s": [], "cache_bytes": [], "has_cache": has_cache}
    for c in contexts:
        ids = _ids(model, c, vocab_size)
        if not has_cache:
            out["prefill_s"].append(median_time(lambda: model(ids), repeats=repeats, device=device))
            out["decode_s"].append(out["prefill_s"][-1])
            out["cache_bytes"].append(None)
            continue
        out["prefill_s"].append(median_time(lambda: model(ids, cache=model.new_cache(1)), repeats=repeats,
                                            device=device))
        cache = model.new_cache(1)
        logits, cache = model(ids, cache=cache)
        out["cache_bytes"].append(int(cache.nbytes()))
        token = logits[:, -1:].argmax(-1)

        def step():
            nonlocal token
            for _ in range(decode_steps):
                logits, _ = model(token, cache=cache)
                token = logits.argmax(-1)

        out["decode_s"].append(median_time(step, repeats=repeats, device=device) / decode_steps)
    ids = _ids(model, eval_len, vocab_size)
    if has_cache:
        cache = model.new_cache(1)
        model(ids, cache=cache)
        out["cache_bytes_eval"] = int(cache.nbytes())
    else:
        out["cache_bytes_eval"] = None
    out["peak_memory_bytes"] = int(peak_memory(lambda: model(ids), device=device))
    model.train(was_training)
    return out
