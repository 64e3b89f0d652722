"""Decoding speed and cache memory of hybrid models on the CPU (``python -m hybridattn.bench.models``).

Targets, ~20M-parameter models, one sequence, float32:

- at context 32,768, a hybrid 3:1 model's per-token decoding latency is <= 0.4x that of the same model with
  softmax attention in every layer, and its cache bytes are <= 0.3x;
- a pure linear (Gated DeltaNet) model's per-token latency stays within +-10% from context 1K to 64K.

Prefilling 32K-64K tokens on a shared 2-core CPU would take minutes per model, so the caches are filled
*synthetically*: every KV cache receives random keys/values for ``context`` tokens (the exact tensors a prefill
would leave) and every recurrent cache a random state marked as having consumed ``context`` tokens. A decoding
step's cost depends only on these sizes, not on the values. Latencies are medians over rounds in which the
compared models take turns in a shuffled order, so that load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from hybridattn.bench.measure import TargetRow, format_bytes, print_table, print_targets
from hybridattn.layers.cache import KVCache, RecurrentCache, SlidingWindowKVCache
from hybridattn.models.config import ModelConfig
from hybridattn.models.hybrid_lm import HybridLM


def bench_config(hybrid: str, *, d_model: int = 384, num_layers: int = 8, vocab_size: int = 16_384) -> ModelConfig:
    """The ~20M-parameter model of the benchmark with layout ``hybrid`` ("3:1", "0:1", "1:0")."""
    return ModelConfig(
        vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, hybrid=hybrid, linear_mixer="gated_deltanet",
        attention=dict(num_heads=6, num_kv_heads=6, head_dim=64),  # multi-head (GPT-style), no GQA
        linear=dict(num_heads=3, num_v_heads=6, head_dim=64, v_head_dim=64),
        ffn=dict(kind="swiglu", intermediate_size=1024),
    )


@torch.no_grad()
def fill_cache(model: HybridLM, context: int, *, batch: int = 1, generator: torch.Generator | None = None):
    """A cache in the state a ``context``-token prefill leaves: random KV entries / recurrent states / conv tails.

    Raises:
        TypeError: a layer's cache kind has no synthetic fill (DSA, pinned globals): prefill for real instead.
    """
    cache = model.new_cache(batch)
    device = next(model.parameters()).device
    for c in cache.layers:
        _fill(c, context, batch, lambda shape, dtype: torch.randn(shape, generator=generator, dtype=dtype).to(device))
    return cache


def _fill(c, context: int, batch: int, randn) -> None:
    from hybridattn.layers.mixers.conv_attention import ConvKVCache

    if isinstance(c, ConvKVCache):
        _fill(c.kv, context, batch, randn)
        c.tail.copy_(randn(c.tail.shape, c.tail.dtype))
    elif isinstance(c, (KVCache, SlidingWindowKVCache)):
        shape = (batch, context, c.num_heads, c.head_dim)
        c.update(randn(shape, c.dtype), randn(shape, c.dtype))
    elif isinstance(c, RecurrentCache):
        # a delta-rule state stays O(1) in norm, so a scaled Gaussian is a plausible one
        state = randn(c.state.shape, c.state.dtype) * 0.1
        if c.conv_tail is not None:
            c.conv_tail.copy_(randn(c.conv_tail.shape, c.conv_tail.dtype))
        c.advance(state, context)
    else:
        raise TypeError(f"cache: no synthetic fill for {type(c).__name__}")


def _step_fn(model: HybridLM, cache):
    token = torch.zeros(1, 1, dtype=torch.long)

    def step():
        with torch.no_grad():
            model(token, cache=cache)

    return step


def interleaved_latency(steps: dict, *, rounds: int, per_round: int, seed: int = 0) -> dict:
    """Median seconds per call of each ``steps[name]()``, the callables taking turns each round in a shuffled
    order (a fixed order lets the position in the round bias the comparison)."""
    samples = {name: [] for name in steps}
    for fn in steps.values():  # warm-up: the first append may grow a KV cache's storage
        fn()
        fn()
    rng = random.Random(seed)
    names = list(steps)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            fn = steps[name]
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - start) / per_round)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32_768, help="context of the hybrid vs softmax comparison")
    parser.add_argument("--linear-contexts", default="1024,4096,16384,65536",
                        help="contexts of the pure-linear flatness check")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine fair)")
    parser.add_argument("--quick", action="store_true", help="small model and contexts (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    size = dict(d_model=64, num_layers=4, vocab_size=256) if args.quick else {}
    context = 512 if args.quick else args.context
    linear_contexts = [64, 512] if args.quick else [int(c) for c in args.linear_contexts.split(",")]

    models = {name: HybridLM(bench_config(layout, **size)).eval()
              for name, layout in (("hybrid 3:1", "3:1"), ("all softmax", "0:1"), ("pure linear", "1:0"))}
    print("models: " + ", ".join(f"{n} {m.num_parameters() / 1e6:.1f}M params" for n, m in models.items()))
    print(f"caches filled synthetically to the context (random KV / states of the exact size); "
          f"{args.threads} thread(s); medians over {args.rounds} rounds x {args.per_round} steps")

    caches = {n: fill_cache(models[n], context, generator=gen) for n in ("hybrid 3:1", "all softmax")}
    lat = interleaved_latency({n: _step_fn(models[n], caches[n]) for n in caches},
                              rounds=args.rounds, per_round=args.per_round)
    nbytes = {n: c.nbytes() for n, c in caches.items()}
    del caches

    lin_caches = {c: fill_cache(models["pure linear"], c, generator=gen) for c in linear_contexts}
    lin_lat = interleaved_latency({c: _step_fn(models["pure linear"], cache) for c, cache in lin_caches.items()},
                                  rounds=args.rounds, per_round=args.per_round)

    print_table(f"decoding one token at context {context:,} (CPU, float32, batch 1)",
                ("model", "per-token latency", "cache"),
                [(n, f"{lat[n] * 1e3:.2f} ms", format_bytes(nbytes[n])) for n in lat])
    print_table("pure linear model: per-token latency vs context", ("context", "latency", "cache"),
                [(f"{c:,}", f"{lin_lat[c] * 1e3:.2f} ms", format_bytes(lin_caches[c].nbytes())) for c in lin_lat])
    spread = max(abs(v / lin_lat[linear_contexts[0]] - 1) for v in lin_lat.values())
    rows = [
        TargetRow(f"hybrid 3:1 vs all-softmax latency @ {context:,}", "<= 0.4x",
                  f"{lat['hybrid 3:1'] * 1e3:.2f} vs {lat['all softmax'] * 1e3:.2f} ms",
                  lat["hybrid 3:1"] / lat["all softmax"], 0.4, higher_is_better=False),
        TargetRow(f"hybrid 3:1 vs all-softmax cache bytes @ {context:,}", "<= 0.3x",
                  f"{format_bytes(nbytes['hybrid 3:1'])} vs {format_bytes(nbytes['all softmax'])}",
                  nbytes["hybrid 3:1"] / nbytes["all softmax"], 0.3, higher_is_better=False),
        TargetRow(f"pure linear latency spread {linear_contexts[0]:,}..{linear_contexts[-1]:,}",
                  "within +-10% of the shortest context",
                  " / ".join(f"{lin_lat[c] * 1e3:.2f}" for c in linear_contexts) + " ms", spread, 0.10,
                  higher_is_better=False),
    ]
    return print_targets("models: targets", rows)


if __name__ == "__main__":
    main()
