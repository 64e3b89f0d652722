import pytest
import torch

from hybridattn.layers.cache import Cache, KVCache, SlidingWindowKVCache, token_positions


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
