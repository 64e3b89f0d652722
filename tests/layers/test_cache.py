import pytest
import torch

from hybridattn.layers.cache import (
    Cache, KVCache, PinnedWindowKVCache, RecurrentCache, SlidingWindowKVCache, token_positions,
)


def _chunks(total: int, sizes):
    """Split ``total`` tokens into calls of the given sizes (cycled), e.g. a prefill then one-token steps."""
    out, i, start = [], 0, 0
    while start < total:
        n = min(sizes[i % len(sizes)], total - start)
        out.append((start, start + n))
        start, i = start + n, i + 1
    return out


def test_kv_cache_appends_in_order_and_doubles_capacity():
    b, h, d, total = 2, 3, 5, 70
    k = torch.randn(b, total, h, d)
    v = torch.randn(b, total, h, d)
    cache = KVCache(b, h, d, capacity=4)
    capacities = {cache.capacity}
    for s, e in _chunks(total, [9, 1, 1, 3]):
        k_all, v_all, valid = cache.update(k[:, s:e], v[:, s:e])
        assert valid is None  # no padding: the caller may skip the key mask
        torch.testing.assert_close(k_all, k[:, :e], rtol=0, atol=0)
        torch.testing.assert_close(v_all, v[:, :e], rtol=0, atol=0)
        capacities.add(cache.capacity)
    assert sorted(capacities) == [4, 9, 18, 36, 72]  # amortised: a handful of reallocations, not one per step
    assert cache.seen_tokens == total and cache.real_tokens.tolist() == [total, total]
    expected_bytes = 2 * (b * 72 * h * d * 4) + b * 72 * 1 + b * 8
    assert cache.nbytes() == expected_bytes


def test_kv_cache_tracks_padding_and_real_positions():
    cache = KVCache(2, 1, 2, capacity=2)
    mask = torch.tensor([[False, False, True], [True, True, True]])
    torch.testing.assert_close(cache.positions(3, mask), torch.tensor([[0, 0, 0], [0, 1, 2]]))
    _, _, valid = cache.update(torch.randn(2, 3, 1, 2), torch.randn(2, 3, 1, 2), mask)
    assert valid.tolist() == mask.tolist()
    assert cache.real_tokens.tolist() == [1, 3]
    torch.testing.assert_close(cache.positions(2), torch.tensor([[1, 2], [3, 4]]))
    _, _, valid = cache.update(torch.randn(2, 1, 1, 2), torch.randn(2, 1, 1, 2))
    assert valid.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert cache.real_tokens.tolist() == [2, 4] and cache.seen_tokens == 4
    cache.clear()
    assert cache.seen_tokens == 0 and cache.length == 0 and cache.real_tokens.tolist() == [0, 0]


def test_token_positions_without_cache():
    assert token_positions(None, 4).tolist() == [0, 1, 2, 3]
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert token_positions(mask, 4).tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]


@pytest.mark.parametrize("sizes", [[1], [5, 1], [13], [2, 3]], ids=lambda s: "-".join(map(str, s)))
def test_sliding_window_cache_returns_buffer_then_new_and_keeps_w_slots(sizes):
    b, h, d, w, total = 2, 2, 3, 5, 23
    k = torch.randn(b, total, h, d)
    v = torch.randn(b, total, h, d)
    mask = torch.ones(b, total, dtype=torch.bool)
    mask[0, :4] = False  # left padding of row 0
    cache = SlidingWindowKVCache(b, h, d, w)
    nbytes = cache.nbytes()
    for s, e in _chunks(total, sizes):
        k_all, v_all, valid = cache.update(k[:, s:e], v[:, s:e], mask[:, s:e])
        first = max(0, s - w)  # the buffer holds the last W tokens before this call
        torch.testing.assert_close(k_all, k[:, first:e], rtol=0, atol=0)
        torch.testing.assert_close(v_all, v[:, first:e], rtol=0, atol=0)
        assert valid.tolist() == mask[:, first:e].tolist()
        assert cache.nbytes() == nbytes  # storage never grows
    assert cache.real_tokens.tolist() == [total - 4, total]
    assert cache.k.shape[1] == w


def test_cache_validation():
    cache = KVCache(2, 3, 4)
    with pytest.raises(ValueError, match="k: expected"):
        cache.update(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
    with pytest.raises(ValueError, match="v: expected shape"):
        cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 2, 3, 4))
    with pytest.raises(TypeError, match="token_mask"):
        cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), torch.ones(2, 1))
    with pytest.raises(ValueError, match="token_mask"):
        cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="window"):
        SlidingWindowKVCache(1, 1, 1, 0)
    cache.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), torch.tensor([[False, False], [False, True]]))
    with pytest.raises(ValueError, match="token_mask: expected left padding"):  # row 1 already has a real token
        cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), torch.tensor([[False], [False]]))
    assert cache.seen_tokens == 2 and cache.real_tokens.tolist() == [0, 1]  # the refused call changed nothing
    assert Cache().nbytes() == 0 and Cache().seen_tokens == 0


def test_pinned_window_cache_returns_old_pinned_keys_then_the_window():
    # row 0 is left-padded by 3: its token at position p sits in slot p + 3
    b, h, d, w, total, pads = 2, 2, 3, 3, 17, [3, 0]
    k = torch.randn(b, total, h, d)
    v = torch.randn(b, total, h, d)
    mask = torch.arange(total) >= torch.tensor(pads)[:, None]
    cache = PinnedWindowKVCache(b, h, d, w, [5, 0, 1])
    assert cache.pinned == (0, 1, 5) and cache.nbytes() == 2 * (b * 6 * h * d * 4) + b * 6 + b * 8
    nbytes = cache.nbytes()
    for s, e in _chunks(total, [4, 1, 2]):
        k_all, v_all, valid = cache.update(k[:, s:e], v[:, s:e], mask[:, s:e])
        first = max(0, s - w)  # window part: the buffered tokens, then the new ones
        pos = cache.key_positions(k_all.shape[1])
        n_pinned = k_all.shape[1] - (e - first)
        assert n_pinned == 3  # with padding, every pinned slot is returned, masked until it left the window
        torch.testing.assert_close(k_all[:, n_pinned:], k[:, first:e], rtol=0, atol=0)
        torch.testing.assert_close(v_all[:, n_pinned:], v[:, first:e], rtol=0, atol=0)
        assert valid[:, n_pinned:].tolist() == mask[:, first:e].tolist()
        for row, pad in enumerate(pads):
            window_positions = list(range(first - pad, e - pad))
            assert pos[row, n_pinned:].tolist() == window_positions
            for i, p in enumerate(cache.pinned):
                live = p < window_positions[0]  # seen, and no longer in the window
                assert bool(valid[row, i]) == live and pos[row, i].item() == (p if live else -1)
                if live:
                    torch.testing.assert_close(k_all[row, i], k[row, p + pad], rtol=0, atol=0)
                    torch.testing.assert_close(v_all[row, i], v[row, p + pad], rtol=0, atol=0)
        assert cache.nbytes() == nbytes


def test_pinned_window_cache_without_padding_returns_only_pinned_keys_outside_the_window():
    k = torch.randn(1, 12, 1, 2)
    cache = PinnedWindowKVCache(1, 1, 2, 4, [0, 6])
    k_all, _, valid = cache.update(k[:, :5], k[:, :5])
    assert valid is None and cache.consecutive and cache.key_positions(5) is None  # columns are positions
    k_all, _, valid = cache.update(k[:, 5:6], k[:, 5:6])
    assert valid is None and not cache.consecutive
    assert cache.key_positions(k_all.shape[1]).tolist() == [[0, 1, 2, 3, 4, 5]]
    torch.testing.assert_close(k_all, k[:, :6], rtol=0, atol=0)
    k_all, _, _ = cache.update(k[:, 6:12], k[:, 6:12])
    assert cache.key_positions(k_all.shape[1]).tolist() == [[0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    torch.testing.assert_close(k_all[:, 0], k[:, 0], rtol=0, atol=0)
    k_all, _, _ = cache.update(k[:, :0], k[:, :0])  # an empty call changes nothing
    assert cache.key_positions(k_all.shape[1]).tolist() == [[0, 6, 8, 9, 10, 11]]
    torch.testing.assert_close(k_all[:, :2], k[:, [0, 6]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="pinned: expected token positions >= 0"):
        PinnedWindowKVCache(1, 1, 2, 4, [-1])
    with pytest.raises(TypeError, match="pinned: expected an iterable of int"):
        PinnedWindowKVCache(1, 1, 2, 4, 3)


def _fill(cache, k, mask):
    return [cache.update(k[:, s:e], k[:, s:e], None if mask is None else mask[:, s:e]) for s, e in _chunks(9, [4, 1])]


@pytest.mark.parametrize("make", [
    lambda: KVCache(2, 1, 3, capacity=2),
    lambda: SlidingWindowKVCache(2, 1, 3, 4),
    lambda: PinnedWindowKVCache(2, 1, 3, 3, [0, 2]),
], ids=["kv", "sliding_window", "pinned_window"])
def test_reset_forgets_everything_and_keeps_storage(make):
    k = torch.randn(2, 9, 1, 3)
    padded = torch.arange(9) >= torch.tensor([[3], [0]])
    used = make()
    _fill(used, torch.randn(2, 9, 1, 3), padded)  # padding and keys that must not leak into what follows
    shapes = [t.shape for t in used.tensors()]
    used.reset()
    assert used.seen_tokens == 0 and used.real_tokens.tolist() == [0, 0]
    assert [t.shape for t in used.tensors()] == shapes
    for got, expected in zip(_fill(used, k, None), _fill(make(), k, None)):
        assert (got[2] is None) and (expected[2] is None)  # no padding remembered either
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


def test_recurrent_cache_reset_and_protocol():
    cache = RecurrentCache(torch.zeros(2, 1, 2, 2), torch.zeros(2, 3, 4))
    cache.advance(torch.ones(2, 1, 2, 2), 5, torch.tensor([[False] + [True] * 4, [True] * 5]))
    cache.conv_tail.fill_(1.0)
    cache.reset()
    assert cache.seen_tokens == 0 and cache.real_tokens.tolist() == [0, 0]
    assert not cache.state.any() and not cache.conv_tail.any()
    with pytest.raises(NotImplementedError, match="Cache.reset: every cache must implement reset"):
        Cache().reset()
