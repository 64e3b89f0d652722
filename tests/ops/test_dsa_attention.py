"""DeepSeek Sparse Attention against its dense float64 reference and full attention."""

import pytest
import torch

from hybridattn.ops.dsa_attention import dsa_attention, dsa_attention_reference, lightning_indexer
from hybridattn.ops.softmax_attention import softmax_attention


def _inputs(b=2, tq=37, tk=37, h=6, hkv=2, d=12, dv=10, hi=3, di=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return (make(b, tq, h, d), make(b, tk, hkv, d), make(b, tk, hkv, dv), make(b, tq, hi, di), make(b, tk, di),
            torch.rand(b, tq, hi, generator=gen))


def _grads(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad.to(out.dtype))


@pytest.mark.parametrize("top_k,causal,tq", [(5, True, 37), (8, False, 37), (4, True, 11)],
                         ids=["k5-causal", "k8-bidir", "k4-causal-Tq11"])
def test_matches_dense_reference(top_k, causal, tq):
    q, k, v, iq, ik, w = _inputs(tq=tq)
    kw = dict(top_k=top_k, causal=causal)
    grad = torch.randn(q.shape[0], tq, q.shape[2], v.shape[-1])
    out, got = _grads(lambda q, k, v: dsa_attention(q, k, v, iq, ik, index_weights=w, **kw), (q, k, v), grad)
    ref, want = _grads(lambda q, k, v: dsa_attention_reference(q.double(), k.double(), v.double(), iq, ik,
                                                              index_weights=w, **kw), (q, k, v), grad)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_top_k_at_least_t_is_full_attention():
    q, k, v, iq, ik, w = _inputs(tq=29, tk=29)
    for causal in (True, False):
        out = dsa_attention(q.double(), k.double(), v.double(), iq.double(), ik.double(), top_k=40, causal=causal)
        ref = softmax_attention(q.double(), k.double(), v.double(), causal=causal, backend="naive")
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_selection_is_the_top_k_of_the_indexer():
    q, k, v, iq, ik, w = _inputs(b=1, tq=33, tk=33, seed=3)
    _, (idx, ok) = dsa_attention(q, k, v, iq, ik, top_k=6, index_weights=w, return_indices=True, chunk_size=7)
    scores = lightning_indexer(iq, ik, w)[0]
    for t in range(33):
        sel = idx[0, t][ok[0, t]].tolist()
        assert len(sel) == min(6, t + 1) and all(s <= t for s in sel)
        rest = [s for s in range(t + 1) if s not in sel]
        if rest:
            assert float(scores[t, sel].min()) >= float(scores[t, rest].max())


def test_validation():
    q, k, v, iq, ik, w = _inputs()
    with pytest.raises(ValueError, match="index_k"):
        dsa_attention(q, k, v, iq, ik[:, :, :5], top_k=4)
    with pytest.raises(ValueError, match="index_weights"):
        dsa_attention(q, k, v, iq, ik, top_k=4, index_weights=w[:, :, :2])
    with pytest.raises(ValueError, match="top_k"):
        dsa_attention(q, k, v, iq, ik, top_k=0)


@pytest.mark.parametrize("scale, err, match", [("x", TypeError, "scale: expected a float"),
                                               (float("nan"), ValueError, "scale: expected a finite float")])
def test_scale_is_validated(scale, err, match):
    q, k, v, iq, ik, w = _inputs()
    with pytest.raises(err, match=match):
        dsa_attention(q, k, v, iq, ik, top_k=4, scale=scale)
    with pytest.raises(err, match=match):
        dsa_attention_reference(q, k, v, iq, ik, top_k=4, scale=scale)
