"""Luong dot / general, Bahdanau additive, softcap and sinks: hand-computed cases, then the fast forms against
plain float64 formulas (outputs and gradients) on awkward shapes."""

import math

import pytest
import torch

from hybridattn.ops import masks
from hybridattn.ops.attention_variants import (
    attention_with_sinks,
    bahdanau_attention,
    luong_dot_attention,
    luong_general_attention,
    softcap_attention,
)
from hybridattn.ops.softmax_attention import softmax_attention

F64 = dict(dtype=torch.float64)


def t(x):
    """A nested list as a float64 tensor ``[B=1, T, H=1, D]`` (rows are time steps)."""
    return torch.tensor(x, **F64)[None, :, None, :]


def two_way(s0, s1, v0, v1):
    """Softmax over two logits applied to two scalar values."""
    return (math.exp(s0) * v0 + math.exp(s1) * v1) / (math.exp(s0) + math.exp(s1))


def test_luong_dot_is_unscaled():
    q, k, v = t([[1.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]]), t([[2.0], [4.0]])
    o = luong_dot_attention(q, k, v)
    assert float(o) == pytest.approx(two_way(1.0, 0.0, 2.0, 4.0), rel=1e-12)


def test_luong_general_hand_computed():
    q, k, v = t([[1.0, 1.0]]), t([[1.0, 0.0], [0.0, 1.0]]), t([[2.0], [4.0]])
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0]], **F64)  # logits q W k = 2 and 1
    assert float(luong_general_attention(q, k, v, w)) == pytest.approx(two_way(2.0, 1.0, 2.0, 4.0), rel=1e-12)
    # rectangular W: Dq = 3, Dk = 2, per-head weights
    q3 = t([[1.0, 0.0, 1.0]])
    w3 = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.5, 3.0]]], **F64)  # q W = [1.5, 3.0] -> logits 1.5, 3.0
    assert float(luong_general_attention(q3, k, v, w3)) == pytest.approx(two_way(1.5, 3.0, 2.0, 4.0), rel=1e-12)


def test_bahdanau_hand_computed():
    # W_q = W_k = I, v_a = [1, 1]: s_j = tanh(q + k_j) summed over the two features
    q, k, v = t([[0.0, 0.0]]), t([[math.atanh(0.5), 0.0], [0.0, math.atanh(-0.25)]]), t([[2.0], [4.0]])
    eye, ones = torch.eye(2, **F64), torch.ones(2, **F64)
    o = bahdanau_attention(q, k, v, eye, eye, ones)
    assert float(o) == pytest.approx(two_way(0.5, -0.25, 2.0, 4.0), rel=1e-12)


def test_softcap_hand_computed():
    q, k, v = t([[2.0]]), t([[1.0], [0.0]]), t([[2.0], [4.0]])
    o = softcap_attention(q, k, v, softcap=1.0, scale=1.0)  # logits 2, 0 -> tanh(2), 0
    assert float(o) == pytest.approx(two_way(math.tanh(2.0), 0.0, 2.0, 4.0), rel=1e-12)


def test_sinks_hand_computed():
    q, k, v = t([[0.0]]), t([[0.0]]), t([[6.0]])
    # one key with logit 0 and a sink with logit log 2: the key gets 1 / (1 + 2) of the mass
    o = attention_with_sinks(q, k, v, torch.tensor([math.log(2.0)], **F64))
    assert float(o) == pytest.approx(2.0, rel=1e-12)


def plain_additive(q, k, v, w_q, w_k, v_a, keep):
    """The formula with the full [B, Hq, Tq, Tk, A] tensor (test-sized inputs only)."""
    g = q.shape[2] // k.shape[2]
    qa = torch.einsum("bqhd,da->bhqa", q, w_q)
    ka = torch.einsum("bkhd,da->bhka", k, w_k).repeat_interleave(g, dim=1)
    s = torch.tanh(qa[:, :, :, None] + ka[:, :, None]) @ v_a
    s = s.masked_fill(~keep, float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", w, v.repeat_interleave(g, dim=2))


def grads_of(fn, leaves, seed=3):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    o = fn(*leaves)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=o.dtype)
    return [o.detach(), *torch.autograd.grad(o, leaves, do)]


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_bahdanau_chunks_match_the_formula_with_gradients(chunk_size):
    g = torch.Generator().manual_seed(0)
    b, tq, tk, hq, hkv, dq, dk, dv, a = 2, 7, 9, 4, 2, 5, 3, 6, 11
    leaves = [torch.randn(*shape, generator=g, **F64) for shape in
              [(b, tq, hq, dq), (b, tk, hkv, dk), (b, tk, hkv, dv), (dq, a), (dk, a), (a,)]]
    spec = masks.causal() & masks.padding([9, 4])
    keep = spec.dense(tq, tk)
    got = grads_of(lambda *x: bahdanau_attention(*x, mask=spec, chunk_size=chunk_size), leaves)
    ref = grads_of(lambda *x: plain_additive(*x, keep), leaves)
    for x, r in zip(got, ref):
        torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-12)


def test_sinks_match_softmax_with_an_extra_zero_value_key():
    """A sink is a key with logit z_h and value 0; appending one to dense logits must give the same answer."""
    g = torch.Generator().manual_seed(1)
    b, tq, tk, hq, hkv, d = 2, 5, 6, 4, 2, 8
    q, k, v = (torch.randn(b, n, h, d, generator=g, **F64) for n, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    sinks = torch.randn(hq, generator=g, **F64)
    got = grads_of(lambda q, k, v, z: attention_with_sinks(q, k, v, z, causal=True), [q, k, v, sinks])

    def reference(q, k, v, z):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) / math.sqrt(d)
        s = s.masked_fill(~masks.causal().dense(tq, tk), float("-inf"))
        s = torch.cat([s, z.view(1, hq, 1, 1).expand(b, hq, tq, 1)], dim=-1)
        w = torch.softmax(s, dim=-1)[..., :tk]
        return torch.einsum("bhqk,bkhd->bqhd", w, v.repeat_interleave(2, dim=2))

    for x, r in zip(got, grads_of(reference, [q, k, v, sinks])):
        torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-12)


def test_sinks_fully_masked_rows_are_zero_without_nan_grads():
    q, k, v = (torch.randn(1, 3, 1, 4, **F64, requires_grad=True) for _ in range(3))
    z = torch.zeros(1, **F64, requires_grad=True)
    o = attention_with_sinks(q, k, v, z, mask=masks.padding([0]))
    assert torch.equal(o, torch.zeros_like(o))
    o.sum().backward()
    assert all(torch.equal(x.grad, torch.zeros_like(x.grad)) for x in (q, k, v, z))


@pytest.mark.parametrize("backend", ["naive", "sdpa", "tiled"])
def test_luong_forms_run_on_every_backend(backend):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 7, 2, 6, generator=g) for _ in range(3))
    w = torch.randn(6, 6, generator=g)
    ref = softmax_attention(q.double() @ w.double(), k.double(), v.double(), scale=1.0, causal=True,
                            backend="naive")
    o = luong_general_attention(q, k, v, w, causal=True, backend=backend)
    assert float((o.double() - ref).abs().max() / ref.abs().max()) <= 1e-5
    ref_dot = softmax_attention(q.double(), k.double(), v.double(), scale=1.0, backend="naive")
    o_dot = luong_dot_attention(q, k, v, backend=backend)
    assert float((o_dot.double() - ref_dot).abs().max() / ref_dot.abs().max()) <= 1e-5


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda q, k, v: luong_general_attention(q, k, v, torch.randn(4, 5)), "weight: expected shape"),
        (lambda q, k, v: bahdanau_attention(q, k, v, torch.randn(4, 3), torch.randn(4, 3), torch.randn(2)),
         "w_q: expected shape"),
        (lambda q, k, v: bahdanau_attention(q, k, v, torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 1)),
         "v_a: expected shape"),
        (lambda q, k, v: bahdanau_attention(q, k, v, torch.randn(4, 3), torch.randn(4, 3), torch.randn(3),
                                            chunk_size=0), "chunk_size"),
        (lambda q, k, v: attention_with_sinks(q, k, v, torch.randn(3)), "sinks: expected shape"),
        (lambda q, k, v: bahdanau_attention(q, k, v, torch.randn(4, 3), torch.randn(4, 3), torch.randn(3),
                                            mask=masks.padding([1, 2, 3])), "mask: expected batch size"),
    ],
)
def test_validation(fn, match):
    q, k, v = torch.randn(2, 5, 2, 4), torch.randn(2, 6, 1, 4), torch.randn(2, 6, 1, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        fn(q, k, v)
