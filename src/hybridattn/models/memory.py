"""Memory planner: what a model's weights and inference caches cost at a given context, per layer kind, and what
the same model would cost with softmax attention in every layer.

    p = plan(ModelConfig.preset("qwen3-next-80b"), context=262_144, batch=1, dtype=torch.bfloat16)
    p.cache_bytes, p.softmax_only.cache_bytes
    print_plan(p)                                  # rich tables

Numbers are counted, not estimated: the layers are built on the ``meta`` device (no memory) to count parameters,
and every layer's ``new_cache`` is asked for its tensors. A KV cache holds, per row and slot, a key and a value
of ``Hkv * D`` entries plus a validity flag (1 byte), and a per-row counter of real tokens (8 bytes); the plan
counts one slot per token of the context, what the tokens occupy. A growing cache allocates its slots in doublings
from 64 (or exactly what one long prefill needs), so its ``nbytes()`` can exceed the plan by up to 2x between
two doublings; a sliding-window cache has ``W`` slots whatever the context; a ``RecurrentCache`` holds a state
``[H, Dk, Dv]`` (float32) and a conv tail ``[K - 1, C]`` (model dtype) per row, also independent of the context.
Composite caches add their parts: DSA's ``DSACache`` is a KV cache plus one indexer key ``[Di]`` per slot
(counted as keys), and ``conv_attention``'s a KV cache plus a conv tail. Other caches are assumed not to grow.

Only decoder layouts are planned: a layer whose mixer is not causal (Linformer, LSH) or has no cache raises
``ValueError`` naming ``layers[i]``.

Shape legend: B batch, T context, H heads, D head dim, K conv kernel, C conv channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridattn.layers.cache import KVCache, RecurrentCache, SlidingWindowKVCache
from hybridattn.layers.dsa_attention import DSACache
from hybridattn.layers.mixers.conv_attention import ConvKVCache

#: Context lengths of the seeds' attention-matrix table.
SEED_CONTEXTS = (512, 4_096, 32_768)


@dataclass
class KindMemory:
    """Totals over every layer using mixer ``mixer``."""

    mixer: str
    layers: int = 0
    params: int = 0
    kv_bytes: int = 0      # keys + values
    state_bytes: int = 0   # recurrent states (and any other fixed-size tensor of a non-KV cache)
    conv_bytes: int = 0    # short-conv tails
    other_bytes: int = 0   # bookkeeping: slot validity, real-token counters

    @property
    def cache_bytes(self) -> int:
        return self.kv_bytes + self.state_bytes + self.conv_bytes + self.other_bytes


@dataclass
class MemoryPlan:
    context: int
    batch: int
    dtype: torch.dtype
    kinds: list[KindMemory]
    params: int            # every parameter (embeddings included, tied ones once)
    param_bytes: int       # params stored in `dtype`
    softmax_only: "MemoryPlan | None" = None
    attention_matrix: dict[int, int] = field(default_factory=dict)  # T -> bytes of one B x H x T x T matrix
    cache_at: dict[int, int] = field(default_factory=dict)  # T -> this model's total cache bytes at context T

    @property
    def cache_bytes(self) -> int:
        return sum(k.cache_bytes for k in self.kinds)


def _cache_bytes(cache, context: int, kind: KindMemory) -> None:
    """Add the bytes ``cache`` (an empty cache from ``new_cache``) will hold after ``context`` tokens."""
    if isinstance(cache, KVCache):  # one slot per token
        itemsize = torch.empty((), dtype=cache.dtype).element_size()
        b = cache.batch_size
        kind.kv_bytes += 2 * b * context * cache.num_heads * cache.head_dim * itemsize
        kind.other_bytes += b * context + cache.real_tokens.numel() * cache.real_tokens.element_size()
    elif isinstance(cache, DSACache):
        _cache_bytes(cache.kv, context, kind)
        kind.kv_bytes += cache.batch_size * context * cache.index_dim * cache.index_k.element_size()
    elif isinstance(cache, ConvKVCache):
        _cache_bytes(cache.kv, context, kind)
        kind.conv_bytes += cache.tail.numel() * cache.tail.element_size()
    elif isinstance(cache, RecurrentCache):
        kind.state_bytes += cache.state.numel() * cache.state.element_size()
        if cache.conv_tail is not None:
            kind.conv_bytes += cache.conv_tail.numel() * cache.conv_tail.element_size()
        kind.other_bytes += cache.real_tokens.numel() * cache.real_tokens.element_size()
    elif isinstance(cache, SlidingWindowKVCache):
        # ring buffers (with any pinned slots) allocate all their storage up front: count what is there
        for t in cache.tensors():
            nbytes = t.numel() * t.element_size()
            if t.is_floating_point():
                kind.kv_bytes += nbytes
            else:
                kind.other_bytes += nbytes
    else:  # a user cache: assume fixed size
        kind.state_bytes += cache.nbytes()


def _layer_plans(config, batch: int, dtype: torch.dtype):
    """One meta-device block per distinct (mixer, feed-forward) pair: its parameter count and an empty cache.
    Layers of the same pair are built from the same config, so they have the same sizes; building each of
    them (48 MoE layers for Qwen3-Next-80B) would only cost time."""
    from hybridattn.models.block import HybridBlock
    from hybridattn.models.hybrid_lm import no_init

    built: dict[tuple[str, str], tuple[int, object]] = {}
    out = []
    with torch.device("meta"), no_init():
        for i, name in enumerate(config.layer_types):
            key = (name, config.ffn_kind(i))
            if key not in built:
                block = HybridBlock(config, i)
                try:
                    cache = block.mixer.new_cache(batch, device="meta", dtype=dtype)
                except (ValueError, NotImplementedError) as e:
                    raise ValueError(f"layers[{i}]: expected a mixer with an inference cache to plan, received "
                                     f"{name!r} ({e})") from e
                built[key] = (sum(p.numel() for p in block.parameters()), cache)
            out.append((name, *built[key]))
    return out


def _kinds(layers, context: int) -> list[KindMemory]:
    kinds: dict[str, KindMemory] = {}
    for name, params, cache in layers:
        kind = kinds.setdefault(name, KindMemory(name))
        kind.layers += 1
        kind.params += params
        _cache_bytes(cache, context, kind)
    return list(kinds.values())


def plan(config, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16, *,
         compare: bool = True) -> MemoryPlan:
    """Parameters and cache bytes of ``config`` at ``context`` tokens for ``batch`` rows in ``dtype``.

    Args:
        config: a ``ModelConfig``.
        context: tokens held by the caches (prompt + generated).
        batch: rows decoded together.
        dtype: dtype of the weights, KV entries and conv tails (recurrent states are float32).
        compare: also plan the same model with ``config.softmax_mixer`` in every layer (``softmax_only``).

    Raises:
        ValueError / TypeError: non-positive ``context`` or ``batch``, a non-dtype ``dtype``; a layer (named
            ``layers[i]``) whose mixer is not causal or has no cache.
    """
    from hybridattn.ops._checks import check_positive_int

    config.check_decoder_layout()
    check_positive_int("context", context)
    check_positive_int("batch", batch)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, received {type(dtype).__name__}")
    layers = _layer_plans(config, batch, dtype)
    d, v = config.d_model, config.vocab_size
    params = sum(p for _, p, _ in layers) + v * d * (1 if config.tie_embeddings else 2) + d  # + final norm
    itemsize = torch.empty((), dtype=dtype).element_size()
    contexts = sorted({*SEED_CONTEXTS, context})
    result = MemoryPlan(
        context=context, batch=batch, dtype=dtype, kinds=_kinds(layers, context), params=params,
        param_bytes=params * itemsize,
        attention_matrix={t: batch * config.attention.num_heads * t * t * itemsize for t in contexts},
        cache_at={t: sum(k.cache_bytes for k in _kinds(layers, t)) for t in contexts},
    )
    if compare:
        softmax = config.replace(layers=[config.softmax_mixer] * config.num_layers)
        result.softmax_only = plan(softmax, context, batch, dtype, compare=False)
    return result


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def print_plan(p: MemoryPlan, *, title: str = "", console=None) -> None:
    """Print the plan as tables (one record per row where a table would not fit the terminal): per layer kind,
    totals vs the softmax-only model, attention matrices."""
    from hybridattn._tables import print_table

    dt = str(p.dtype).replace("torch.", "")
    rows = [(k.mixer, k.layers, f"{k.params:,}", format_bytes(k.kv_bytes), format_bytes(k.state_bytes),
             format_bytes(k.conv_bytes), format_bytes(k.other_bytes), format_bytes(k.cache_bytes)) for k in p.kinds]
    rows.append(("total (+ embeddings)", sum(k.layers for k in p.kinds), f"{p.params:,}",
                 *(format_bytes(sum(getattr(k, a) for k in p.kinds))
                   for a in ("kv_bytes", "state_bytes", "conv_bytes", "other_bytes", "cache_bytes"))))
    print_table(f"{title} memory at context {p.context:,}, batch {p.batch}, {dt}".strip(),
                ("layer kind", "layers", "params", "KV cache", "recurrent state", "conv tail", "bookkeeping",
                 "cache total"), rows, console=console)
    if p.softmax_only is not None:
        s = p.softmax_only
        print_table("vs the same model with softmax attention in every layer",
                    ("model", "params", "weights", "cache", "cache vs softmax-only"),
                    [("this model", f"{p.params:,}", format_bytes(p.param_bytes), format_bytes(p.cache_bytes),
                      f"{p.cache_bytes / s.cache_bytes:.3f}x"),
                     ("softmax only", f"{s.params:,}", format_bytes(s.param_bytes), format_bytes(s.cache_bytes),
                      "1.000x")], console=console)
    n_soft = sum(k.layers for k in p.kinds if k.kv_bytes)
    print_table("attention-matrix memory of one softmax layer (B x H x T x T scores, materialised)",
                ("T", "one layer", "softmax layers of this model", "this model's whole cache at T"),
                [(f"{ctx:,}", format_bytes(nbytes), format_bytes(nbytes * n_soft), format_bytes(p.cache_at[ctx]))
                 for ctx, nbytes in p.attention_matrix.items()], console=console)
