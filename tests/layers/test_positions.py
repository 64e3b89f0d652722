import math

import pytest
import torch

from hybridattn.layers.positions import LearnedPositionEmbedding, T5RelativeBias, t5_relative_bucket


def t5_bucket_scalar(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucketing written out for one integer (key_pos - query_pos), as in the paper's reference code."""
    bucket, n = 0, num_buckets
    if bidirectional:
        n //= 2
        if rel > 0:
            bucket += n
        d = abs(rel)
    else:
        d = max(-rel, 0)
    exact = n // 2
    if d < exact:
        return bucket + d
    large = exact + int(math.log(d / exact) / math.log(max_distance / exact) * (n - exact))
    return bucket + min(large, n - 1)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (10, 20)])
def test_t5_buckets_match_scalar_reference(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-300, 301)
    got = t5_relative_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    expected = [t5_bucket_scalar(r, bidirectional, num_buckets, max_distance) for r in rel.tolist()]
    assert got.tolist() == expected
    assert int(got.min()) == 0 and int(got.max()) == num_buckets - 1  # every bucket reachable, none beyond


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (3, 40)])
def test_t5_bias_dense_block_and_score_mod(bidirectional, q_len, kv_len):
    module = T5RelativeBias(3, num_buckets=16, max_distance=32, bidirectional=bidirectional).double()
    bias = module()
    dense = bias.dense(q_len, kv_len, dtype=torch.float64)
    expected = torch.empty(1, 3, q_len, kv_len, dtype=torch.float64)
    for i in range(q_len):
        for j in range(kv_len):
            bucket = t5_bucket_scalar(j - (i + kv_len - q_len), bidirectional, 16, 32)
            expected[0, :, i, j] = module.weight[bucket]
    torch.testing.assert_close(dense, expected, rtol=0, atol=0)
    qi, ki = torch.tensor([q_len - 1, 0]), torch.arange(1, kv_len, 4)
    torch.testing.assert_close(bias.block(q_len, kv_len, qi, ki, dtype=torch.float64), expected[:, :, qi][:, :, :, ki])
    h = torch.arange(3).view(1, 3, 1, 1)
    q = torch.arange(q_len).view(1, 1, q_len, 1)
    k = torch.arange(kv_len).view(1, 1, 1, kv_len)
    modded = bias.score_mod(q_len, kv_len)(torch.zeros(1, 3, q_len, kv_len, dtype=torch.float64), 0, h, q, k)
    torch.testing.assert_close(modded, expected, rtol=0, atol=0)


def test_t5_bias_gradient_reaches_the_table():
    module = T5RelativeBias(2, num_buckets=8, max_distance=16)
    dense = module().dense(5, 5)
    (dense * torch.arange(25.0).view(1, 1, 5, 5)).sum().backward()
    grad = module.weight.grad
    # bucket b of head h collects the sum of the weights of the pairs that fall into it
    rel = torch.arange(5).view(1, 5) - torch.arange(5).view(5, 1)
    buckets = t5_relative_bucket(rel, bidirectional=True, num_buckets=8, max_distance=16)
    expected = torch.zeros(8).index_add_(0, buckets.flatten(), torch.arange(25.0))
    torch.testing.assert_close(grad, expected[:, None].expand(8, 2))


def test_t5_validation():
    with pytest.raises(ValueError, match="num_buckets"):
        T5RelativeBias(2, num_buckets=2)
    with pytest.raises(ValueError, match="max_distance"):
        T5RelativeBias(2, num_buckets=32, max_distance=8)


def test_learned_position_embedding():
    emb = LearnedPositionEmbedding(10, 6)
    pos = torch.tensor([[0, 3, 9], [1, 1, 2]])
    torch.testing.assert_close(emb(pos), emb.weight[pos])
    emb(pos).sum().backward()
    assert emb.weight.grad[1].tolist() == [2.0] * 6 and emb.weight.grad[5].tolist() == [0.0] * 6
    with pytest.raises(ValueError, match="positions"):
        emb(torch.tensor([10]))
    with pytest.raises(TypeError, match="positions"):
        emb(torch.tensor([1.0]))


@pytest.mark.slow  # the first flex_attention call costs ~10 s of set-up on the CPU
def test_t5_score_mod_runs_in_flex_attention():
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    bias = T5RelativeBias(4, num_buckets=8, max_distance=16, bidirectional=False).double()()
    q, k, v = (torch.randn(2, 4, n, 8, dtype=torch.float64) for n in (5, 9, 9))  # flex layout [B, H, T, D]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": the unfused path is what we test here
        out = flex_attention(q, k, v, score_mod=bias.score_mod(5, 9))
        weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + bias.dense(5, 9, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(out, weights @ v, rtol=1e-10, atol=1e-10)
