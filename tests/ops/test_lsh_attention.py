"""Reformer LSH attention: chunked fast path == dense float64 reference; one bucket == full attention."""

import pytest
import torch

from hybridattn.ops.lsh_attention import lsh_attention, lsh_attention_reference, lsh_buckets
from hybridattn.ops.softmax_attention import softmax_attention

CASES = [
    dict(n_buckets=4, n_hashes=1, causal=False, chunk_size=None),
    dict(n_buckets=6, n_hashes=3, causal=True, chunk_size=5),
    dict(n_buckets=2, n_hashes=2, causal=False, chunk_size=8),
]


@pytest.mark.parametrize("shared", [False, True], ids=["separate-k", "shared-qk"])
@pytest.mark.parametrize("case", CASES, ids=["nb4-h1", "nb6-h3-causal-c5", "nb2-h2-c8"])
def test_matches_dense_reference(case, shared):
    gen = torch.Generator().manual_seed(1)
    b, t, h, d, dv = 2, 31, 4, 10, 6
    hkv = h if shared else 2
    q = torch.randn(b, t, h, d, generator=gen)
    k = None if shared else torch.randn(b, t, hkv, d, generator=gen)
    v = torch.randn(b, t, hkv, dv, generator=gen)
    grad = torch.randn(b, t, h, dv, generator=gen)
    leaves32 = [x.clone().requires_grad_() for x in (q, k, v) if x is not None]
    leaves64 = [x.double().requires_grad_() for x in (q, k, v) if x is not None]
    split = lambda xs: (xs[0], None, xs[1]) if shared else tuple(xs)  # noqa: E731
    out = lsh_attention(*split(leaves32), seed=5, **case)
    ref = lsh_attention_reference(*split(leaves64), seed=5, **case)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out, leaves32, grad)
    want = torch.autograd.grad(ref, leaves64, grad.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_is_full_attention(causal):
    q, k, v = torch.randn(2, 27, 4, 8), torch.randn(2, 27, 2, 8), torch.randn(2, 27, 2, 8)
    out = lsh_attention(q, k, v, n_buckets=1, n_hashes=2, causal=causal)
    torch.testing.assert_close(out, softmax_attention(q, k, v, causal=causal, backend="naive"),
                               rtol=1e-5, atol=1e-6)


def test_buckets_group_similar_keys():
    # two tight clusters of directions land in different buckets in most rounds, and in one bucket each
    base = torch.randn(2, 16)
    keys = torch.cat([base[0] + 0.01 * torch.randn(8, 16), base[1] + 0.01 * torch.randn(8, 16)]).view(1, 16, 1, 16)
    buckets = lsh_buckets(keys, n_buckets=8, n_hashes=4, seed=0)[:, 0, 0]  # (rounds, T)
    assert all(len(set(r[:8].tolist())) == 1 and len(set(r[8:].tolist())) == 1 for r in buckets)


def test_validation():
    q = torch.randn(1, 10, 2, 4)
    with pytest.raises(ValueError, match="n_buckets"):
        lsh_attention(q, q, q, n_buckets=3)
    with pytest.raises(ValueError, match="Tk == Tq"):
        lsh_attention(q, q[:, :5], q[:, :5], n_buckets=2)
