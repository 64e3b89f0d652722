"""Every sparse mask spec through every ``softmax_attention`` backend that takes it, against a float64 dense
masked softmax written here (its masks from the specs' documented formulas, not from ``spec.dense`` or the
library's naive backend): outputs and the gradients of q, k, v, fp32, relative error <= 1e-5.

Awkward shapes throughout: odd lengths, D=48 / Dv=40, GQA 6 query heads on 2 key-value heads, Tq != Tk in both
directions, a batch row that keeps no key and query rows that keep none.
"""

import pytest
import torch

from hybridattn.ops import masks
from hybridattn.ops.softmax_attention import choose_backend, softmax_attention

TOL = 1e-5  # fp32, max |x - ref| / max |ref|
HQ, HKV, D, DV = 6, 2, 48, 40


def reference(q, k, v, keep):
    """Float64 softmax attention over ``keep [B|1, H|1, Tq, Tk]``; a row that keeps nothing gives zeros."""
    g = q.shape[2] // k.shape[2]
    kh, vh = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = D ** -0.5 * torch.einsum("bihd,bjhd->bhij", q, kh)
    row_any = keep.any(-1, keepdim=True)
    s = torch.where(row_any, s.masked_fill(~keep, float("-inf")), torch.zeros_like(s))
    w = torch.softmax(s, dim=-1) * row_any
    return torch.einsum("bhij,bjhd->bihd", w, vh)


# Each keep function takes query positions p (bottom-right aligned: p = i + Tk - Tq) ``[Tq, 1]`` and key
# positions j ``[1, Tk]`` and returns a bool ``[Tq, Tk]``; batch / head dependent ones return ``[B|1, H|1, ...]``.
def window(left, right=0):
    return lambda p, j: (p - j <= left) & (j - p <= right)


def causal(p, j):
    return j <= p


def is_global(idx):
    return lambda x: torch.isin(x, torch.tensor(idx))


def global_tokens(idx):
    return lambda p, j: is_global(idx)(p) | is_global(idx)(j)


def both(*fns):
    def keep(p, j):
        out = fns[0](p, j)
        for fn in fns[1:]:
            out = out & fn(p, j)
        return out
    return keep


def padded(lengths):
    return lambda p, j: j[None, None] < torch.tensor(lengths).view(-1, 1, 1, 1)


def documents(cu):
    doc = lambda x: torch.searchsorted(torch.tensor(cu[1:]), x, right=True)  # noqa: E731
    return lambda p, j: doc(p) == doc(j)


PER_HEAD = torch.rand(HQ, 2, 2, generator=torch.Generator().manual_seed(0)) < 0.6
PER_HEAD[:, 1] = False  # an empty query block (rows 32..36 keep nothing)
PER_HEAD[:, 0, 0] = True

# id: (spec, independent keep or "dense" (BigBird's random blocks come from its hash: its own dense mask),
#      B, Tq, Tk)
CASES = {
    "window-causal": (masks.sliding_window(9) & masks.causal(), both(window(9), causal), 2, 37, 37),
    "window-both": (masks.sliding_window(5, 7), window(5, 7), 2, 37, 37),
    "dilated": (masks.dilated(12, 3, right=4), lambda p, j: window(12, 4)(p, j) & ((p - j) % 3 == 0), 2, 37, 37),
    "strided-causal": (masks.strided(6) & masks.causal(),
                       both(lambda p, j: ((p - j).abs() < 6) | ((p - j) % 6 == 0), causal), 2, 37, 37),
    "fixed": (masks.fixed(8, 2), lambda p, j: (p // 8 == j // 8) | (j % 8 >= 6), 2, 37, 37),
    "global-causal": (masks.global_tokens([0, 5, 99]) & masks.causal(), both(global_tokens([0, 5]), causal), 2, 37,
                      37),
    "longformer&padding": (masks.longformer(4, [1, 30]) & masks.padding([37, 0]),
                           both(lambda p, j: window(4, 4)(p, j) | global_tokens([1, 30])(p, j), padded([37, 0])),
                           2, 37, 37),
    "window&document": (masks.sliding_window(6, 6) & masks.document([0, 11, 12, 30, 37]),
                        both(window(6, 6), documents([0, 11, 12, 30, 37])), 1, 37, 37),
    "bigbird": (masks.bigbird(1, 1, 1, block=8, seed=3), "dense", 2, 37, 37),
    "bigbird-causal": (masks.bigbird(1, 1, 2, block=8, seed=4, causal=True) & masks.causal(), "dense", 2, 37, 37),
    "block_sparse-per-head": (masks.block_sparse(PER_HEAD, block=32),
                              lambda p, j: PER_HEAD[None, :, p // 32, j // 32], 1, 37, 37),
    "window-causal-Tq>Tk": (masks.sliding_window(7) & masks.causal(), both(window(7), causal), 2, 45, 31),
    "window&padding-Tq<Tk": (masks.sliding_window(11, 3) & masks.padding([37, 20]),
                             both(window(11, 3), padded([37, 20])), 2, 19, 37),
    # long enough that auto runs the block-sparse kernel (64 x 32 tiles from T=512)
    "window-causal-T515": (masks.sliding_window(40) & masks.causal(), both(window(40), causal), 1, 515, 515),
}
BACKENDS = ["naive", "sdpa", "tiled", "block_sparse", "auto"]


def inputs(b, tq, tk, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64)
            for shape in ((b, tq, HQ, D), (b, tk, HKV, D), (b, tk, HKV, DV), (b, tq, HQ, DV))]


def keep_mask(case):
    spec, keep, b, tq, tk = CASES[case]
    if keep == "dense":
        return spec.dense(tq, tk).expand(b, HQ, tq, tk)
    p = torch.arange(tq)[:, None] + tk - tq
    return keep(p, torch.arange(tk)[None, :]).expand(b, HQ, tq, tk)


_REFERENCES = {}


def reference_with_grads(case):
    """Reference output and gradients, computed once per case and shared by the backends."""
    if case not in _REFERENCES:
        spec, _, b, tq, tk = CASES[case]
        q, k, v, do = (x.requires_grad_(i < 3) for i, x in enumerate(inputs(b, tq, tk)))
        o = reference(q, k, v, keep_mask(case))
        _REFERENCES[case] = (o.detach(), *torch.autograd.grad(o, (q, k, v), do))
    return _REFERENCES[case]


def rel_err(x, ref):
    return float((x.detach().double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_dense_reference(case, backend):
    spec, _, b, tq, tk = CASES[case]
    if tq > 100 and backend not in ("block_sparse", "auto"):
        pytest.skip("the long case checks the block-sparse kernel's production tiles and auto's choice of it")
    q, k, v, do = (x.float().requires_grad_(i < 3) for i, x in enumerate(inputs(b, tq, tk)))
    o = softmax_attention(q, k, v, mask=spec, backend=backend)
    got = (o, *torch.autograd.grad(o, (q, k, v), do))
    for name, x, r in zip(("o", "dq", "dk", "dv"), got, reference_with_grads(case)):
        assert x.dtype == torch.float32
        assert rel_err(x, r) <= TOL, f"{name}: relative error {rel_err(x, r):.2e}"


def test_fully_masked_rows_are_zero_with_zero_grads():
    spec, _, b, tq, tk = CASES["window-causal-Tq>Tk"]
    empty = ~keep_mask("window-causal-Tq>Tk")[0, 0].any(-1)  # rows 0..13 sit before every key
    assert empty.sum() == tq - tk
    for backend in BACKENDS:
        q, k, v, do = (x.float().requires_grad_(i < 3) for i, x in enumerate(inputs(b, tq, tk)))
        o = softmax_attention(q, k, v, mask=spec, backend=backend)
        (dq,) = torch.autograd.grad(o, (q,), do)
        assert torch.equal(o[:, empty], torch.zeros_like(o[:, empty])), backend
        assert torch.equal(dq[:, empty], torch.zeros_like(dq[:, empty])), backend


def test_auto_runs_block_sparse_on_the_long_case():
    spec, _, b, tq, tk = CASES["window-causal-T515"]
    q, k, v, _ = inputs(b, tq, tk)
    assert choose_backend(q.float(), k.float(), v.float(), mask=spec, bias=None, softcap=None) == "block_sparse"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["window-causal", "longformer&padding", "bigbird-causal", "block_sparse-per-head",
                                  "window-causal-Tq>Tk"])
def test_flex_matches_dense_reference(case):
    """Inference only (FlexAttention has no CPU backward); each case compiles a kernel, hence slow."""
    spec, _, b, tq, tk = CASES[case]
    q, k, v, _ = (x.float() for x in inputs(b, tq, tk))
    with torch.no_grad():
        o = softmax_attention(q, k, v, mask=spec, backend="flex")
    assert rel_err(o, reference_with_grads(case)[0]) <= TOL


@pytest.mark.parametrize("scale, err, match", [("x", TypeError, "scale: expected a float, received str"),
                                               (float("inf"), ValueError, "scale: expected a finite float")])
@pytest.mark.parametrize("direct", [False, True], ids=["softmax_attention", "block_sparse_attention"])
def test_scale_is_validated_alike(direct, scale, err, match):
    from hybridattn.ops.block_sparse_attention import block_sparse_attention

    q = torch.randn(1, 9, 2, 4)
    fn = block_sparse_attention if direct else lambda *x, **o: softmax_attention(*x, backend="block_sparse", **o)
    with pytest.raises(err, match=match):
        fn(q, q, q, mask=masks.sliding_window(3), scale=scale)
