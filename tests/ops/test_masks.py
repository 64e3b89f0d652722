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
    b, h, qi, ki = spec._index_grid(torch.arange(tq)[:, None], torch.arange(tk)[None, :], torch.device("cpu"))
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
        (lambda: masks.as_mask_spec(torch.ones(2, dtype=torch.bool)), ValueError, "mask: expected 2 to 4 dimensions"),
        (lambda: masks.as_mask_spec([1, 0]), TypeError, "mask: expected a MaskSpec"),
        (lambda: masks.padding([3]).dense(2, 2), ValueError, "lengths: expected values in"),
    ],
)
def test_validation(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_document_validates_before_reading_the_last_offset():
    for bad, err in [([], ValueError), (5, ValueError), ([[0, 2]], ValueError), ([0.0, 2.0], TypeError),
                     ("ab", TypeError)]:
        with pytest.raises(err, match="cu_seqlens: expected"):
            masks.document(bad)


def _random_leaf(rng, tq, tk, batch):
    """One random spec of every kind, with batch- and head-dependent ones among them."""
    kind = rng.choice(["window", "dilated", "strided", "fixed", "global", "block_sparse", "bigbird", "causal",
                       "padding", "document", "prefix_lm", "tensor"])
    if kind == "window":
        return masks.sliding_window(rng.randint(0, 40), rng.randint(0, 20))
    if kind == "dilated":
        return masks.dilated(rng.randint(0, 50), rng.randint(1, 4), right=rng.randint(0, 9))
    if kind == "strided":
        return masks.strided(rng.randint(1, 30))
    if kind == "fixed":
        block = rng.randint(1, 40)
        return masks.fixed(block, rng.randint(0, block))
    if kind == "global":
        return masks.global_tokens([rng.randint(0, tk + 5) for _ in range(rng.randint(0, 4))])
    if kind == "block_sparse":
        block = rng.randint(1, 40)
        n = -(-tk // block)
        shape = rng.choice([(n, n), (2, n, n), (batch, 1, n, n)])
        return masks.block_sparse(torch.rand(*shape, generator=torch.Generator().manual_seed(rng.randint(0, 99))) < 0.6,
                                  block=block)
    if kind == "bigbird":
        return masks.bigbird(rng.randint(0, 2), rng.randint(0, 2), rng.randint(0, 3), block=rng.randint(1, 30),
                             seed=rng.randint(0, 9), causal=rng.random() < 0.5)
    if kind == "padding":
        return masks.padding([rng.randint(0, tk) for _ in range(batch)])
    if kind == "document":
        return masks.document([0, *sorted(rng.randint(0, tk) for _ in range(rng.randint(0, 3))), tk])
    if kind == "prefix_lm":
        return masks.prefix_lm(rng.randint(0, tk))
    if kind == "tensor":
        return masks.as_mask_spec(torch.rand(1, 2, tq, tk, generator=torch.Generator().manual_seed(rng.randint(0, 99)))
                                  < 0.5)
    return masks.causal()


@pytest.mark.parametrize("seed", range(4))
def test_combined_kept_pairs_equals_the_dense_count(seed):
    # odd lengths up to ~3 tiles of 64, Tq != Tk, so that FULL, EMPTY, PARTIAL and ragged tiles all occur
    import random

    rng = random.Random(seed)
    for _ in range(40):
        tq, tk = rng.randint(1, 200), rng.randint(1, 200)
        batch = rng.randint(2, 3)
        leaves = [_random_leaf(rng, tq, tk, batch) for _ in range(rng.randint(2, 3))]
        if any(isinstance(x, masks.Document) for x in leaves):
            tq = tk
            leaves = [x for x in leaves if not isinstance(x, masks.TensorMask)]
        if len(leaves) < 2:
            leaves.append(masks.causal())
        spec = leaves[0]
        for leaf in leaves[1:]:
            spec = (spec & leaf) if rng.random() < 0.5 else (spec | leaf)
        assert spec.kept_pairs(tq, tk) == int(spec.dense(tq, tk).sum()), (spec, tq, tk)


class _CountingCausal(masks.Causal):
    """Causal, counting the mask entries its mask_mod is asked for."""

    evaluated = 0

    def mask_mod(self, q_len, kv_len):
        f = super().mask_mod(q_len, kv_len)

        def mod(b, h, q, k):
            out = f(b, h, q, k)
            self.evaluated += out.numel()
            return out

        return mod


def test_combined_kept_pairs_evaluates_only_partial_blocks():
    t = 4096
    counting = _CountingCausal()
    spec = masks.sliding_window(512) & counting
    assert spec.kept_pairs(t, t) == sum(min(i + 1, 513) for i in range(t))
    # 64 x 64 blocks: the diagonal and the window's edge are PARTIAL, about 2 blocks per row; T^2 = 16.8M
    assert 0 < counting.evaluated <= 3 * 64 * t


def test_combined_kept_pairs_at_16k():
    # counted per block (the test above checks the work: no T x T evaluation); timings are in docs/benchmarks.md
    for spec, expected in [(masks.sliding_window(512) & masks.causal(), 8_273_664),
                           (masks.longformer(256, list(range(16))), None)]:
        kept = spec.kept_pairs(16384, 16384)
        if expected is None:
            # window: 513 keys per row minus the 2 x sum(1..256) missing at the edges; globals: 16 full rows and
            # columns, minus the global pairs already inside the window
            window = 16384 * 513 - 2 * (256 * 257 // 2)
            overlap = sum(min(16384, g + 257) - max(0, g - 256) for g in range(16)) * 2 - 16 * 16
            expected = window + 2 * 16 * 16384 - 16 * 16 - overlap
        assert kept == expected, spec


@pytest.mark.parametrize("call, match", [
    (lambda: masks.causal().dense(-1, 3), "q_len: expected an int >= 0, received -1"),
    (lambda: masks.causal().kept_pairs(3, -1), "kv_len: expected an int >= 0, received -1"),
    (lambda: masks.causal().kept_pairs(3, 3, block=0), "block: expected an int > 0, received 0"),
    (lambda: masks.padding([2]).block_layout(3, 3, 2, 0), "block_k: expected an int > 0, received 0"),
    (lambda: masks.document([0, 3]).block_layout(3, 3, -2, 1), "block_q: expected an int > 0, received -2"),
    (lambda: masks.prefix_lm(1).kept_pairs(-2, 3), "q_len: expected an int >= 0, received -2"),
    (lambda: (masks.causal() & masks.padding([1])).dense(2, -3), "kv_len: expected an int >= 0, received -3"),
])
def test_methods_validate_lengths_and_blocks(call, match):
    with pytest.raises(ValueError, match=match):
        call()
