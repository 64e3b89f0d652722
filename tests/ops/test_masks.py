"""The mask-spec base: each spec's dense form against a hand-written rule, and every derived form (kept_pairs,
block_layout, dense_rows, dense_block, mask_mod, & and |) against the dense form."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hybridattn.ops import masks
from hybridattn.ops.masks import EMPTY, FULL, PARTIAL


def rule(name, b, i, j, tq, tk, arg):
    """The definition of each spec, one (query, key) pair at a time."""
    if name == "causal":
        return j <= i + tk - tq
    if name == "padding":
        return j < arg[b]
    if name == "document":
        doc = lambda p: sum(1 for c in arg[1:] if c <= p)  # noqa: E731
        return doc(i) == doc(j)
    if name == "prefix_lm":
        return j < arg or j <= i + tk - tq
    raise AssertionError(name)


def spec_of(name, arg):
    return {"causal": lambda: masks.causal(), "padding": lambda: masks.padding(arg),
            "document": lambda: masks.document(arg), "prefix_lm": lambda: masks.prefix_lm(arg)}[name]()


CASES = [
    ("causal", 5, 5, None), ("causal", 3, 6, None), ("causal", 6, 3, None),
    ("padding", 4, 6, [6, 2, 0]), ("document", 7, 7, [0, 2, 2, 5, 7]),
    ("prefix_lm", 6, 6, 3), ("prefix_lm", 4, 7, 2),
]


@pytest.mark.parametrize("name, tq, tk, arg", CASES)
def test_dense_matches_the_definition(name, tq, tk, arg):
    spec = spec_of(name, arg)
    dense = spec.dense(tq, tk)
    nb = len(arg) if name == "padding" else 1
    expected = torch.tensor([[[[rule(name, b, i, j, tq, tk, arg) for j in range(tk)] for i in range(tq)]]
                             for b in range(nb)])
    assert dense.shape == (nb, 1, tq, tk)
    assert torch.equal(dense, expected)


def test_causal_is_bottom_right_for_cross_attention():
    assert masks.causal().dense(2, 4)[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    # more queries than keys: the first rows see nothing
    assert masks.causal().dense(4, 2)[0, 0].tolist() == [[False, False], [False, False], [True, False],
                                                         [True, True]]


def test_combinators():
    a, b = masks.causal(), masks.padding([3, 5])
    da, db = a.dense(5, 5), b.dense(5, 5)
    assert torch.equal((a & b).dense(5, 5), da & db)
    assert torch.equal((a | b).dense(5, 5), da | db)
    t = torch.rand(2, 1, 5, 5) < 0.5
    assert torch.equal((a & t).dense(5, 5), da & t)  # a bool tensor combines like a spec
    assert torch.equal((t | a).dense(5, 5), t | da)
    with pytest.raises(ValueError, match="batch size"):
        masks.padding([1, 2]) & masks.padding([1, 2, 3])


def reference_layout(dense, bq, bk):
    """EMPTY / PARTIAL / FULL per tile from the dense mask (keys past Tk count as neither)."""
    nb, nh, tq, tk = dense.shape
    out = torch.empty(nb, nh, -(-tq // bq), -(-tk // bk), dtype=torch.int8)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            tile = dense[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].flatten(2)
            out[:, :, i, j] = torch.where(tile.all(-1), FULL, torch.where(tile.any(-1), PARTIAL, EMPTY))
    return out


SPECS = st.sampled_from(["causal", "padding", "document", "prefix_lm", "combined", "tensor"])


@given(SPECS, st.integers(1, 30), st.integers(1, 30), st.integers(1, 9), st.integers(1, 9), st.integers(0, 99))
def test_derived_forms_agree_with_dense(name, tq, tk, bq, bk, seed):
    g = torch.Generator().manual_seed(seed)
    if name == "document":
        tq = tk
        cuts = sorted(torch.randint(0, tk + 1, (3,), generator=g).tolist())
        spec = masks.document([0, *cuts, tk])
    elif name == "padding":
        spec = masks.padding(torch.randint(0, tk + 1, (3,), generator=g))
    elif name == "prefix_lm":
        spec = masks.prefix_lm(int(torch.randint(0, tk + 1, (1,), generator=g)))
    elif name == "combined":
        spec = (masks.causal() & masks.padding(torch.randint(0, tk + 1, (2,), generator=g))) | masks.prefix_lm(1)
    elif name == "tensor":
        spec = masks.as_mask_spec(torch.rand(2, 3, tq, tk, generator=g) < 0.5)
    else:
        spec = masks.causal()
    dense = spec.dense(tq, tk)
    layout = spec.block_layout(tq, tk, bq, bk)
    expected = reference_layout(dense, bq, bk)
    if name == "combined":
        # combinators are allowed to call a tile PARTIAL when it is really EMPTY or FULL (never the reverse)
        assert torch.equal(layout == EMPTY, (layout == EMPTY) & (expected == EMPTY))
        assert bool(((layout == expected) | (layout == PARTIAL)).all())
    else:
        assert torch.equal(layout, expected)
    assert spec.kept_pairs(tq, tk, block=7) == int(dense.sum())
    r0, r1, c0, c1 = tq // 3, tq, tk // 2, tk
    assert torch.equal(spec.dense_rows(tq, tk, r0, r1), dense[:, :, r0:r1])
    assert torch.equal(spec.dense_block(tq, tk, r0, r1, c0, c1), dense[:, :, r0:r1, c0:c1])
    b, h, qi, ki = spec._index_grid(torch.arange(tq), torch.arange(tk), torch.device("cpu"))
    assert torch.equal(spec.mask_mod(tq, tk)(b, h, qi, ki).expand_as(dense), dense)


def test_causal_kept_pairs_closed_form():
    assert masks.causal().kept_pairs(4, 4) == 10
    assert masks.causal().kept_pairs(2, 5) == 4 + 5
    assert masks.causal().kept_pairs(5, 2) == 0 + 0 + 0 + 1 + 2


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: masks.padding([[1, 2]]), ValueError, "lengths: expected an integer tensor"),
        (lambda: masks.padding([1.5]), ValueError, "lengths: expected an integer tensor"),
        (lambda: masks.document([1, 4]), ValueError, "cu_seqlens: expected to start at 0"),
        (lambda: masks.document([0, 3, 2]), ValueError, "cu_seqlens: expected non-decreasing"),
        (lambda: masks.prefix_lm(-1), ValueError, "n: expected an int >= 0"),
        (lambda: masks.as_mask_spec(torch.ones(2, 2, dtype=torch.bool)), ValueError, "mask: expected 4 dimensions"),
        (lambda: masks.as_mask_spec([1, 0]), TypeError, "mask: expected a MaskSpec"),
        (lambda: masks.padding([3]).dense(2, 2), ValueError, "lengths: expected values in"),
    ],
)
def test_validation(make, err, match):
    with pytest.raises(err, match=match):
        make()
