"""Inference costs of a model for the arena: per-token decode latency and cache bytes out to long contexts,
prefill latency, peak memory.

Measured on a batch of one sequence of random tokens (the costs do not depend on the weights), on the
model's own device, with ``hybridattn.bench.measure`` (CUDA-synchronised on GPU).

- decode latency at context ``C``: the time of one single-token step continuing a cache that holds ``C``
  tokens. The cache is filled synthetically (random keys / values / states of exactly the tensors a prefill of
  ``C`` tokens leaves, ``hybridattn.bench.models.fill_cache``), so contexts of 32K cost no 32K prefill; for
  cache kinds without a synthetic fill it is a real prefill. Median over ``repeats`` x ``decode_steps`` steps,
  with the quartiles, so the O(T) per-token cost of a KV cache and the O(1) cost of a state show their slopes;
- cache bytes at ``C``: ``cache.nbytes()`` at that context — KV entries of the softmax layers plus the recurrent
  state and short-conv tail of the linear ones (allocated bytes: a KV cache allocates in doublings);
- prefill latency: one forward filling a fresh cache, at the contexts up to ``prefill_limit``;
- peak memory: the peak of live bytes during the prefill at the evaluation length.

A model without ``new_cache`` (any plain ``input_ids -> logits`` module) gets prefill latency only; its
decode latency is the cost of re-running the whole context, which is what such a model has to do.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from hybridattn.bench.measure import median_time, peak_memory


def _ids(model: nn.Module, length: int, vocab_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab_size, (1, length), generator=g).to(device)


def _cache_at(model, context: int, vocab_size: int):
    from hybridattn.bench.models import fill_cache

    try:
        return fill_cache(model, context, generator=torch.Generator().manual_seed(context))
    except TypeError:  # a cache kind without a synthetic fill: prefill for real
        cache = model.new_cache(1)
        model(_ids(model, context, vocab_size), cache=cache)
        return cache


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


@torch.no_grad()
def measure_inference(model: nn.Module, *, vocab_size: int, contexts: list[int], eval_len: int,
                      repeats: int = 3, decode_steps: int = 4, prefill_limit: int = 4096) -> dict:
    """Latency, cache bytes and peak memory of ``model`` (see module docstring).

    Args:
        model: ``HybridLM`` (with caches) or any ``input_ids -> logits`` module.
        vocab_size: range of the random token ids.
        contexts: context lengths to measure decoding at.
        eval_len: the task's evaluation length, for cache bytes and peak memory.
        repeats: timed repeats per measurement.
        decode_steps: single-token steps timed per repeat (each a sample of the decode spread).
        prefill_limit: prefill latency is measured at the contexts up to this length (None beyond).

    Returns:
        ``{"contexts": [...], "prefill_s": [... | None], "decode_s": [...], "decode_q1_s": [...],
        "decode_q3_s": [...], "cache_bytes": [...], "cache_bytes_eval": int | None, "peak_memory_bytes": int,
        "has_cache": bool}``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    has_cache = hasattr(model, "new_cache")
    out = {"contexts": list(contexts), "prefill_s": [], "decode_s": [], "decode_q1_s": [], "decode_q3_s": [],
           "cache_bytes": [], "has_cache": has_cache}
    for c in contexts:
        ids = _ids(model, c, vocab_size) if c <= prefill_limit or not has_cache else None
        if not has_cache:
            t = median_time(lambda: model(ids), repeats=repeats, device=device)
            out["prefill_s"].append(t)
            for key in ("decode_s", "decode_q1_s", "decode_q3_s"):
                out[key].append(t)
            out["cache_bytes"].append(None)
            continue
        out["prefill_s"].append(None if ids is None else median_time(lambda: model(ids, cache=model.new_cache(1)),
                                                                     repeats=repeats, device=device))
        samples = []
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        for _ in range(repeats):
            cache = _cache_at(model, c, vocab_size)
            model(token, cache=cache)  # warm-up step: first-call allocations out of the timing
            for _ in range(decode_steps):
                start = time.perf_counter()
                model(token, cache=cache)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                samples.append(time.perf_counter() - start)
        q1, med, q3 = _quartiles(samples)
        out["decode_s"].append(med)
        out["decode_q1_s"].append(q1)
        out["decode_q3_s"].append(q3)
        out["cache_bytes"].append(int(cache.nbytes()))
        del cache
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
