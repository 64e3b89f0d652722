"""KV caches that follow their pattern's reach: decoding (prefill, then calls of 1, 2, 3 tokens) equals the full
forward at every position, and the cache holds the reach (a ring buffer of ``lookback + 1`` keys, plus the pinned
global tokens), not every token. The full forward itself is checked against a float64 reference in
test_attention.py."""

import pytest
import torch

from hybridattn.layers import attention as attention_module
from hybridattn.layers.attention import MultiHeadAttention
from hybridattn.layers.cache import KVCache, PinnedWindowKVCache, SlidingWindowKVCache
from hybridattn.ops import masks

T = 29  # more than three times every window below

# name -> (pattern, cache type, ring slots, pinned positions); slots None = the growing KVCache
CASES = {
    "sliding_window": (masks.sliding_window(3), SlidingWindowKVCache, 4, ()),
    "dilated": (masks.dilated(6, 3), SlidingWindowKVCache, 7, ()),
    "longformer": (masks.longformer(3, [0]) & masks.causal(), PinnedWindowKVCache, 4, (0,)),
    "longformer_late_global": (masks.longformer(2, [0, 5]), PinnedWindowKVCache, 6, (0, 5)),
    "global_in_window": (masks.global_tokens([0, 9]) & masks.sliding_window(2), SlidingWindowKVCache, 3, ()),
    "fixed": (masks.fixed(4, 1), KVCache, None, ()),
    "strided": (masks.strided(3), KVCache, None, ()),
    "bigbird": (masks.bigbird(1, 1, 1, 2, seed=1, causal=True), KVCache, None, ()),
}


def _layer(pattern, **options):
    torch.manual_seed(0)
    return MultiHeadAttention(32, 4, n_kv_heads=2, pattern=pattern, **options).double().eval()


def _decode(layer, x, prompt, sizes, token_mask=None, cache=None):
    """Prefill ``prompt`` tokens, then calls of ``sizes`` tokens (cycled); returns the outputs and the cache."""
    cache = layer.new_cache(x.shape[0]) if cache is None else cache
    bounds, start, i = [(0, prompt)], prompt, 0
    while start < x.shape[1]:
        bounds.append((start, min(x.shape[1], start + sizes[i % len(sizes)])))
        start, i = bounds[-1][1], i + 1
    outs = [layer(x[:, s:e], cache=cache, token_mask=None if token_mask is None else token_mask[:, s:e])
            for s, e in bounds]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("prompt", [1, 7, 9])
@pytest.mark.parametrize("name", list(CASES))
def test_decode_equals_full_forward_and_cache_holds_the_reach(name, prompt, padded):
    pattern, cache_type, slots, pinned = CASES[name]
    layer = _layer(pattern)
    x = torch.randn(3, T, 32, dtype=torch.float64)
    mask = torch.arange(T) >= torch.tensor([[0], [2], [5]]) if padded else None
    with torch.no_grad():
        full = layer(x, token_mask=mask)
        fresh = layer.new_cache(3)
        empty_bytes = fresh.nbytes()
        steps, cache = _decode(layer, x, prompt, [1, 2, 3], token_mask=mask, cache=fresh)
    torch.testing.assert_close(steps, full, rtol=1e-12, atol=1e-12)
    assert type(cache) is cache_type and cache.seen_tokens == T
    if slots is None:
        assert cache.length == T
        return
    # storage was allocated once: `slots` ring entries (+ the pinned ones) per row, whatever T
    assert cache.k.shape == cache.v.shape == (3, slots, 2, 8) and cache.valid.shape == (3, slots)
    assert cache.nbytes() == empty_bytes
    if cache_type is PinnedWindowKVCache:
        assert cache.pinned == pinned and cache.pinned_k.shape == (3, len(pinned), 2, 8)
        assert cache.nbytes() == 8 * 3 * (slots + len(pinned)) * 2 * 8 * 2 + 3 * (slots + len(pinned)) + 8 * 3


def test_dilated_ring_masks_the_skipped_distances():
    # dilated(6, 3) keeps distances 0, 3, 6 in a ring of 7: the keys at distances 1, 2, 4, 5 sit in the buffer but
    # must stay masked, so the result differs from a plain window over the same ring
    x = torch.randn(2, T, 32, dtype=torch.float64)
    dilated, window = _layer(masks.dilated(6, 3)), _layer(masks.sliding_window(6))
    with torch.no_grad():
        steps, cache = _decode(dilated, x, 5, [1])
        plain, plain_cache = _decode(window, x, 5, [1])
    assert cache.window == plain_cache.window == 7
    torch.testing.assert_close(steps, dilated(x).detach(), rtol=1e-12, atol=1e-12)
    assert (steps - plain).abs().max() > 1e-3


def test_decode_on_a_growing_cache_gives_the_same_result():
    pattern = CASES["longformer_late_global"][0]
    layer = _layer(pattern)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    with torch.no_grad():
        ring, _ = _decode(layer, x, 7, [2, 1])
        grown, cache = _decode(layer, x, 7, [2, 1], cache=KVCache(2, 2, 8, dtype=torch.float64))
    torch.testing.assert_close(ring, grown, rtol=1e-12, atol=1e-12)
    assert cache.length == T


def test_unpadded_calls_keep_the_fast_path(monkeypatch):
    """Without padding, the mask is the pattern itself (a ring of a window) or one set of positions shared by
    every row (pinned global tokens): never a per-row dense mask."""
    seen = []
    original = attention_module.softmax_attention
    monkeypatch.setattr(attention_module, "softmax_attention",
                        lambda *a, mask=None, **kw: seen.append(mask) or original(*a, mask=mask, **kw))
    x = torch.randn(2, T, 32, dtype=torch.float64)
    window, longformer = _layer(CASES["sliding_window"][0]), _layer(CASES["longformer"][0])
    with torch.no_grad():
        _decode(window, x, 7, [1, 3])
        assert all(mask is window._spec for mask in seen)
        seen.clear()
        _decode(longformer, x, 7, [1, 3])
        assert all(mask.batch_size is None for mask in seen)
        seen.clear()
        longformer(x, token_mask=torch.arange(T) >= torch.tensor([[0], [3]]))
        assert seen[0].batch_size == 2  # padded rows have positions of their own


def test_patterns_that_cannot_be_decoded_raise():
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    # BigBird drawing random blocks among future ones keeps different past blocks as the sequence grows
    unstable = _layer(masks.bigbird(1, 1, 1, 2, causal=False))
    with pytest.raises(ValueError, match="pattern: incremental decoding needs a pattern"):
        unstable.new_cache(2)
    with pytest.raises(ValueError, match="pattern: incremental decoding needs a pattern"):
        unstable(x, cache=KVCache(2, 2, 8, dtype=torch.float64))
    # a non-causal layer: earlier queries would need later keys, whatever the pattern
    encoder = _layer(masks.longformer(2, [0]), causal=False)
    with pytest.raises(ValueError, match="cache: incremental decoding needs causal self-attention"):
        encoder(x, cache=encoder.new_cache(2))


def test_caches_shorter_than_the_reach_are_refused():
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    dilated = _layer(masks.dilated(6, 3))
    with pytest.raises(ValueError, match="cache: expected a KVCache or a SlidingWindowKVCache of window >= 7"):
        dilated(x, cache=SlidingWindowKVCache(2, 2, 8, 6, dtype=torch.float64))
    longformer = _layer(masks.longformer(3, [0, 2]))
    with pytest.raises(ValueError, match=r"expected a KVCache or a PinnedWindowKVCache of window >= 4 pinning "
                                         r"positions \[0, 2\] for this layer, received a PinnedWindowKVCache of "
                                         r"window 4 pinning \[0\]"):
        longformer(x, cache=PinnedWindowKVCache(2, 2, 8, 4, [0], dtype=torch.float64))
    with pytest.raises(ValueError, match="received a SlidingWindowKVCache of window 9"):
        longformer(x, cache=SlidingWindowKVCache(2, 2, 8, 9, dtype=torch.float64))
    # a larger ring than needed is fine
    with torch.no_grad():
        y = longformer(x, cache=PinnedWindowKVCache(2, 2, 8, 9, [0, 2, 3], dtype=torch.float64))
    torch.testing.assert_close(y, longformer(x).detach(), rtol=1e-12, atol=1e-12)


def test_relative_biases_keep_the_growing_cache_for_pinned_tokens():
    # ALiBi / T5 biases follow column distances, which pinned keys in front of the window would break
    layer = _layer(masks.longformer(2, [0]), positions="alibi")
    x = torch.randn(2, T, 32, dtype=torch.float64)
    with torch.no_grad():
        steps, cache = _decode(layer, x, 5, [1, 2])
    assert type(cache) is KVCache
    torch.testing.assert_close(steps, layer(x), rtol=1e-12, atol=1e-12)
    assert type(_layer(masks.sliding_window(3), positions="alibi").new_cache(1)) is SlidingWindowKVCache
