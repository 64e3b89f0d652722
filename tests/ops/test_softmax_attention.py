"""Every softmax backend against the float64 naive reference: outputs and input gradients."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hybridattn.ops import masks
from hybridattn.ops.softmax_attention import DENSE_LIMIT, choose_backend, softmax_attention

TOL = 1e-5  # relative error for fp32, max |x - ref| / max |ref|, outputs and gradients


def rel_err(x, ref):
    """max |x - ref| / max |ref|; where the exact answer is identically zero (e.g. dq with a single key, whose
    softmax is constant) relative error is undefined and the absolute error of unit-scale inputs is used."""
    err = (x.double() - ref).abs().max()
    scale = ref.abs().max()
    return float(err / scale) if scale > 1e-12 else float(err)


def make_qkv(b, tq, tk, hq, hkv, d, dv, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, tk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, tk, hkv, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def build_mask(kind, b, tq, tk, hq, seed=0):
    """A mask argument of the given kind, plus the batch size it needs (document masks pack into B = 1)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return {}
    if kind == "causal":
        return dict(causal=True)
    if kind == "padding":
        lengths = torch.randint(0, tk + 1, (b,), generator=g)
        lengths[0] = 0  # always one fully masked batch row
        return dict(mask=masks.padding(lengths))
    if kind == "document":
        cuts = sorted(torch.randint(0, tk + 1, (3,), generator=g).tolist())
        return dict(mask=masks.document(torch.tensor([0, *cuts, tk])))
    if kind == "prefix_lm":
        return dict(mask=masks.prefix_lm(int(torch.randint(0, tk + 1, (1,), generator=g))), causal=True)
    if kind == "tensor":
        return dict(mask=torch.rand(b, hq, tq, tk, generator=g) < 0.6)
    if kind == "padding&causal|prefix":
        lengths = torch.randint(0, tk + 1, (b,), generator=g)
        return dict(mask=(masks.padding(lengths) & masks.causal()) | masks.prefix_lm(2))
    if kind == "bias":
        return dict(bias=torch.randn(1, hq, tq, tk, generator=g, dtype=torch.float64), causal=True)
    if kind == "softcap":
        return dict(softcap=2.5, causal=True)
    raise AssertionError(kind)


MASK_KINDS = ["none", "causal", "padding", "document", "prefix_lm", "tensor", "padding&causal|prefix", "bias",
              "softcap"]


def run_with_grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do.to(o.dtype))
    return o.detach(), q.grad, k.grad, v.grad


def compare_to_naive(backend_fn, b, tq, tk, hq, hkv, d, dv, kind, *, seed=0, grads=True):
    if kind == "document":
        b, tq = 1, tk
    q, k, v = make_qkv(b, tq, tk, hq, hkv, d, dv, dtype=torch.float64, seed=seed)
    opts = build_mask(kind, b, tq, tk, hq, seed=seed)
    do = torch.randn(b, tq, hq, dv, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    ref = run_with_grads(lambda *x: softmax_attention(*x, backend="naive", **opts), q, k, v, do)
    opts32 = {n: (o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o) for n, o in opts.items()}
    f32 = (q.float(), k.float(), v.float())
    if not grads:
        with torch.no_grad():
            out = backend_fn(*f32, **opts32)
        assert rel_err(out, ref[0]) <= TOL
        return
    got = run_with_grads(lambda *x: backend_fn(*x, **opts32), *f32, do.float())
    for name, x, r in zip(("o", "dq", "dk", "dv"), got, ref):
        assert x.dtype == torch.float32
        assert rel_err(x, r) <= TOL, f"{name}: relative error {rel_err(x, r):.2e}"


SHAPES = st.fixed_dictionaries({
    "b": st.sampled_from([1, 2]),
    "tq": st.sampled_from([1, 7, 63]) | st.integers(1, 80),
    "tk": st.sampled_from([1, 7, 63]) | st.integers(1, 80),
    "hkv": st.sampled_from([1, 2]),
    "ratio": st.sampled_from([1, 2, 4]),
    "d": st.sampled_from([60, 100, 16]),
    "dv": st.sampled_from([60, 100, 24]),
    "kind": st.sampled_from(MASK_KINDS),
    "seed": st.integers(0, 2**16),
})


def _unpack(s):
    return s["b"], s["tq"], s["tk"], s["hkv"] * s["ratio"], s["hkv"], s["d"], s["dv"], s["kind"]


def sdpa_backend(q, k, v, **opts):
    if "softcap" in opts:  # SDPA cannot softcap; auto must route around it
        return softmax_attention(q, k, v, backend="auto", **opts)
    return softmax_attention(q, k, v, backend="sdpa", **opts)


@given(SHAPES)
def test_sdpa_matches_naive(s):
    compare_to_naive(sdpa_backend, *_unpack(s), seed=s["seed"])


@given(SHAPES)
def test_auto_matches_naive(s):
    compare_to_naive(lambda *x, **o: softmax_attention(*x, backend="auto", **o), *_unpack(s), seed=s["seed"])


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
@pytest.mark.parametrize("kind", ["causal", "padding", "document"])
def test_long_odd_length_1000(backend, kind):
    compare_to_naive(lambda *x, **o: softmax_attention(*x, backend=backend, **o), 1, 1000, 1000, 2, 1, 60, 60, kind)


def test_cross_attention_causal_is_bottom_right():
    q, k, v = make_qkv(1, 3, 5, 1, 1, 8, 8, dtype=torch.float64)
    _, w = softmax_attention(q, k, v, causal=True, return_weights=True)
    # query i sees keys j <= i + Tk - Tq = i + 2
    assert torch.equal(w[0, 0] > 0, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool())


@pytest.mark.parametrize("backend", ["naive", "sdpa", "auto"])
def test_fully_masked_rows_give_zeros_and_zero_grads(backend):
    # Tq > Tk with causal: the first Tq - Tk query rows see no key at all
    q, k, v = make_qkv(2, 6, 4, 2, 1, 16, 8)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    o = softmax_attention(q, k, v, causal=True, mask=masks.padding([4, 0]), backend=backend)
    assert torch.isfinite(o).all()
    assert torch.equal(o[:, :2], torch.zeros_like(o[:, :2]))
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    o.sum().backward()
    assert torch.equal(q.grad[:, :2], torch.zeros_like(q.grad[:, :2]))
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1])) and torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_return_weights_are_the_softmax():
    q, k, v = make_qkv(1, 2, 3, 1, 1, 4, 4, dtype=torch.float64)
    o, w = softmax_attention(q, k, v, scale=0.5, return_weights=True)
    s = 0.5 * torch.einsum("bqhd,bkhd->bhqk", q, k)
    expected = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(o, torch.einsum("bhqk,bkhd->bqhd", expected, v), rtol=1e-12, atol=0)


def test_hand_computed_two_keys():
    # logits 0 and log(3) -> weights 1/4 and 3/4
    q = torch.tensor([[[[1.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.0]], [[math.log(3.0)]]]], dtype=torch.float64)
    v = torch.tensor([[[[4.0]], [[8.0]]]], dtype=torch.float64)
    for backend in ("naive", "sdpa"):
        o = softmax_attention(q, k, v, scale=1.0, backend=backend)
        assert abs(float(o) - 7.0) < 1e-12, backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["naive", "sdpa", "auto"])
def test_half_precision_accumulates_in_fp32(dtype, backend):
    q, k, v = make_qkv(1, 65, 65, 2, 1, 64, 64, dtype=dtype)
    ref = softmax_attention(q.double(), k.double(), v.double(), causal=True, backend="naive")
    o = softmax_attention(q, k, v, causal=True, backend=backend)
    assert o.dtype == dtype
    # rounding the output to the half format dominates: one unit in the last place of |o| <= ~3
    assert rel_err(o, ref) <= 2 * torch.finfo(dtype).eps


def test_auto_policy():
    big = torch.empty(1, 32768, 1, 64, device="meta")
    assert choose_backend(big, big, mask=masks.causal(), bias=None, softcap=None) == "sdpa"
    assert choose_backend(big, big, mask=masks.padding([5]), bias=None, softcap=None) == "tiled"
    assert choose_backend(big, big, mask=None, bias=None, softcap=3.0) == "tiled"
    small = torch.empty(1, 64, 2, 64, device="meta")
    assert choose_backend(small, small, mask=masks.padding([5]), bias=None, softcap=None) == "sdpa"
    assert choose_backend(small, small, mask=None, bias=None, softcap=3.0) == "naive"
    assert 64 * 64 * 2 <= DENSE_LIMIT < 32768**2


@pytest.mark.parametrize(
    "change, err, match",
    [
        (dict(q=torch.randn(2, 5, 4)), ValueError, "q: expected 4 dimensions"),
        (dict(k=torch.randn(2, 5, 3, 8), v=torch.randn(2, 5, 3, 8)), ValueError, "q: expected a head count divisible"),
        (dict(k=torch.randn(2, 5, 2, 7)), ValueError, "k: expected"),
        (dict(v=torch.randn(2, 6, 2, 8)), ValueError, "v: expected"),
        (dict(v=torch.randn(2, 5, 2, 8, dtype=torch.float64)), TypeError, "v: expected dtype"),
        (dict(q=torch.ones(2, 5, 4, 8, dtype=torch.long)), TypeError, "q: expected a floating-point"),
        (dict(mask=torch.ones(2, 4, 5, 5)), TypeError, "mask: expected a torch.bool"),
        (dict(mask=torch.ones(2, 4, 3, 5, dtype=torch.bool)), ValueError, "mask: expected the last two"),
        (dict(mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, "mask: expected 4 dimensions"),
        (dict(mask=masks.padding([5, 5, 5])), ValueError, "mask: expected batch size 2"),
        (dict(mask=masks.padding([5, 9])), ValueError, "lengths: expected values in"),
        (dict(mask=masks.document([0, 2, 4])), ValueError, "cu_seqlens: expected"),
        (dict(mask="causal"), TypeError, "mask: expected a MaskSpec"),
        (dict(bias=torch.randn(2, 4, 5, 4)), ValueError, "bias: expected the last two"),
        (dict(bias=torch.randn(3, 1, 5, 5)), ValueError, "bias: expected batch size 2"),
        (dict(bias=3.0), TypeError, "bias: expected a ScoreBias"),
        (dict(backend="flash"), ValueError, "backend: expected one of"),
        (dict(softcap=0.0), ValueError, "softcap: expected a finite float > 0"),
        (dict(scale="1"), TypeError, "scale: expected a float"),
        (dict(causal=1), TypeError, "causal: expected a bool"),
        (dict(return_weights=True, backend="sdpa"), ValueError, "return_weights"),
        (dict(softcap=2.0, backend="sdpa"), ValueError, "softcap: the sdpa backend"),
    ],
)
def test_validation(change, err, match):
    args = dict(q=torch.randn(2, 5, 4, 8), k=torch.randn(2, 5, 2, 8), v=torch.randn(2, 5, 2, 8))
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(err, match=match):
        softmax_attention(q, k, v, **args)


def test_empty_keys_give_zeros():
    q, k, v = make_qkv(1, 3, 0, 2, 2, 8, 5)
    o = softmax_attention(q, k, v)
    assert o.shape == (1, 3, 2, 5) and torch.equal(o, torch.zeros_like(o))
