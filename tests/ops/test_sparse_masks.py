"""Sparse mask specs: every closed form (kept pairs, block layout) against the dense mask it describes."""

import pytest
import torch

from hybridattn.ops import masks
from hybridattn.ops.masks import EMPTY, FULL, MaskSpec


def _reference_mask(spec_name, q_len, kv_len):
    """The same patterns written as plain loops over positions, independent of the spec classes."""
    off = kv_len - q_len
    out = torch.zeros(q_len, kv_len, dtype=torch.bool)
    # BigBird's block layout is taken from the spec: this checks dense / kept_pairs / block_layout against it,
    # while test_bigbird_blocks_per_row and the tests after it check the layout itself against the definition
    bb = masks.bigbird(window=1, n_global=1, n_random=2, block=8, seed=3)
    for i in range(q_len):
        p = i + off
        for j in range(kv_len):
            d = p - j
            out[i, j] = {
                "sliding": -2 <= d <= 5,
                "dilated": -3 <= d <= 9 and d % 3 == 0,
                "strided": abs(d) < 4 or d % 4 == 0,
                "fixed": p // 6 == j // 6 or j % 6 >= 4,
                "global": p in (0, 7, 30) or j in (0, 7, 30),
                "bigbird": bool(bb.layout_for(-(-kv_len // 8))[0, 0, max(p, 0) // 8, j // 8]) and p >= 0,
            }[spec_name]
    return out, bb


SPECS = {
    "sliding": lambda: masks.sliding_window(5, 2),
    "dilated": lambda: masks.dilated(9, 3, right=3),
    "strided": lambda: masks.strided(4),
    "fixed": lambda: masks.fixed(6, 2),
    "global": lambda: masks.global_tokens([0, 7, 30]),
}
SHAPES = [(37, 37), (1, 29), (13, 41), (41, 23)]


def _spec(name):
    return _reference_mask(name, 1, 1)[1] if name == "bigbird" else SPECS[name]()


def _check_layout(layout, dense, bq, bk):
    """EMPTY blocks have no kept pair, FULL blocks keep every pair, PARTIAL blocks are mixed (exact)."""
    tq, tk = dense.shape[-2:]
    for qi in range(layout.shape[-2]):
        for ki in range(layout.shape[-1]):
            blk = dense[..., qi * bq:min(tq, (qi + 1) * bq), ki * bk:min(tk, (ki + 1) * bk)]
            expected = FULL if bool(blk.all()) else (EMPTY if not bool(blk.any()) else 1)
            assert (layout[..., qi, ki] == expected).all(), (qi, ki, layout[..., qi, ki], blk)


@pytest.mark.parametrize("q_len,kv_len", SHAPES, ids=[f"Tq{a}-Tk{b}" for a, b in SHAPES])
@pytest.mark.parametrize("name", [*SPECS, "bigbird"])
def test_spec_matches_loop_reference(name, q_len, kv_len):
    ref, bb = _reference_mask(name, q_len, kv_len)
    spec = bb if name == "bigbird" else SPECS[name]()
    dense = spec.dense(q_len, kv_len)[0, 0]
    assert torch.equal(dense, ref)
    assert spec.kept_pairs(q_len, kv_len) == int(ref.sum())
    for bq, bk in [(4, 4), (5, 8), (16, 3)]:
        layout = spec.block_layout(q_len, kv_len, bq, bk)
        # the closed form must equal the generic dense-derived layout exactly
        assert torch.equal(layout, MaskSpec.block_layout(spec, q_len, kv_len, bq, bk))
        _check_layout(layout, dense, bq, bk)


def test_block_sparse_layout_per_head():
    gen = torch.Generator().manual_seed(1)
    lay = torch.rand(3, 5, 5, generator=gen) > 0.5
    spec = masks.block_sparse(lay, block=7)
    dense = spec.dense(33, 33)
    assert dense.shape == (1, 3, 33, 33)
    expected = lay[:, torch.arange(33) // 7][:, :, torch.arange(33) // 7]
    assert torch.equal(dense[0], expected)
    assert spec.kept_pairs(33, 33) == int(expected.sum())
    for bq, bk in [(4, 6), (7, 7), (10, 3)]:
        layout = spec.block_layout(33, 33, bq, bk)
        assert torch.equal(layout, MaskSpec.block_layout(spec, 33, 33, bq, bk))
    with pytest.raises(ValueError, match="layout"):
        spec.dense(40, 40)


def test_compositions_with_causal_padding_document():
    window = masks.sliding_window(4, 4)
    lengths = torch.tensor([29, 17])
    combos = {
        "window&causal": (window & masks.causal(), 29, 29),
        "longformer&padding": (masks.longformer(3, [0, 11]) & masks.padding(lengths), 29, 29),
        "bigbird&causal": (masks.bigbird(1, 1, 1, block=4, seed=0) & masks.causal(), 29, 29),
        "fixed&document": (masks.fixed(5, 1) & masks.document([0, 12, 29]), 29, 29),
        "strided|global": (masks.strided(3) | masks.global_tokens([5]), 21, 29),
    }
    for name, (spec, tq, tk) in combos.items():
        dense = spec.dense(tq, tk)
        left, right = spec.left.dense(tq, tk), spec.right.dense(tq, tk)
        expected = (left & right) if spec.op == "and" else (left | right)
        assert torch.equal(dense, expected), name
        assert spec.kept_pairs(tq, tk) == int(dense.sum()), name
        layout = spec.block_layout(tq, tk, 4, 6)
        # combined layouts may be conservative (PARTIAL where exact would say FULL / EMPTY) but never wrong
        for qi in range(layout.shape[-2]):
            for ki in range(layout.shape[-1]):
                blk = dense[..., qi * 4:(qi + 1) * 4, ki * 6:(ki + 1) * 6]
                for b in range(layout.shape[0]):
                    if layout[b, 0, qi, ki] == EMPTY:
                        assert not blk[b if blk.shape[0] > 1 else 0].any(), name
                    if layout[b, 0, qi, ki] == FULL:
                        assert blk[b if blk.shape[0] > 1 else 0].all(), name


def test_mask_mods_run_under_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    for spec in [masks.sliding_window(3, 1), masks.dilated(6, 2), masks.strided(5), masks.fixed(6, 2),
                 masks.global_tokens([2]), masks.bigbird(1, 1, 1, block=4)]:
        dense = spec.dense(24, 24)
        block_mask = flex.create_block_mask(spec.mask_mod(24, 24), None, None, 24, 24, device="cpu", BLOCK_SIZE=8)
        out = flex.flex_attention(q, k, v, block_mask=block_mask)
        ref = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~dense, float("-inf")), -1) @ v
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_closed_forms_scale_without_t_squared():
    # T = 2^20: a dense mask would be 10^12 entries; the closed forms answer at once
    t = 1 << 20
    assert masks.sliding_window(511).kept_pairs(t, t) == sum(min(i + 1, 512) for i in range(512)) + (t - 512) * 512
    layout = masks.sliding_window(511).block_layout(t, t, 4096, 4096)
    assert layout.shape == (1, 1, 256, 256) and int((layout > 0).sum()) == 256 + 255
    assert masks.global_tokens([0, 5]).kept_pairs(t, t) == 2 * t + (t - 2) * 2


@pytest.mark.parametrize("bad,match", [
    (lambda: masks.sliding_window(-1), "left"),
    (lambda: masks.dilated(4, 0), "dilation"),
    (lambda: masks.fixed(4, 5), "summary"),
    (lambda: masks.global_tokens([-1]), "indices"),
    (lambda: masks.block_sparse(torch.ones(2, 2)), "layout"),
    (lambda: masks.strided(1.5), "stride"),
    (lambda: masks.strided(0), "stride: expected an int > 0, received 0"),
    (lambda: masks.fixed(0, 0), "block: expected an int > 0, received 0"),
    (lambda: masks.fixed(4, -1), "summary: expected an int >= 0, received -1"),
    (lambda: masks.bigbird(window=-1), "window: expected an int >= 0"),
    (lambda: masks.bigbird(n_global=-2), "n_global: expected an int >= 0"),
    (lambda: masks.bigbird(n_random=-1), "n_random: expected an int >= 0"),
    (lambda: masks.bigbird(block=0), "block: expected an int > 0"),
    (lambda: masks.bigbird(seed=-1), "seed: expected an int >= 0"),
    (lambda: masks.bigbird(seed=1.5), "seed: expected an int, received float"),
    (lambda: masks.block_sparse(torch.ones(4, dtype=torch.bool)), "layout: expected \\[nQb, nKb\\]"),
    (lambda: masks.block_sparse(torch.ones(1, 1, 1, 2, 2, dtype=torch.bool)), "layout: expected \\[nQb, nKb\\]"),
    (lambda: masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), block=0), "block: expected an int > 0"),
    (lambda: masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), block=4).dense(9, 9),
     "layout: expected at least \\(3, 3\\) blocks"),
    (lambda: masks.block_sparse(torch.ones(2, 3, dtype=torch.bool), block=4).kept_pairs(5, 9),
     "layout: expected at least \\(3, 3\\) blocks"),
    (lambda: masks.global_tokens("a"), "indices: expected"),
    (lambda: masks.global_tokens(None), "indices: expected"),
    (lambda: masks.global_tokens([[0, 1]]), "indices: expected a 1-D"),
    (lambda: masks.global_tokens(3), "indices: expected a 1-D"),
    (lambda: masks.global_tokens([0.5]), "indices: expected int positions, received torch.float32"),
    (lambda: masks.global_tokens([True]), "indices: expected int positions, received torch.bool"),
])
def test_validation_names_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def test_global_tokens_of_the_wrong_type_is_a_type_error():
    for bad in ("a", None, [0.5]):
        with pytest.raises(TypeError, match="indices"):
            masks.global_tokens(bad)


METHOD_SPECS = [masks.sliding_window(2), masks.fixed(4, 1), masks.global_tokens([1]), masks.bigbird(1, 1, 1, block=2),
                masks.block_sparse(torch.ones(8, 8, dtype=torch.bool), block=2), masks.longformer(2, [0])]


@pytest.mark.parametrize("spec", METHOD_SPECS, ids=repr)
@pytest.mark.parametrize("call,err,match", [
    (lambda s: s.dense(-1, 4), ValueError, "q_len: expected an int >= 0, received -1"),
    (lambda s: s.dense(4, -2), ValueError, "kv_len: expected an int >= 0, received -2"),
    (lambda s: s.kept_pairs(-1, 4), ValueError, "q_len: expected an int >= 0, received -1"),
    (lambda s: s.kept_pairs(4, -1), ValueError, "kv_len: expected an int >= 0, received -1"),
    (lambda s: s.kept_pairs(4.0, 4), TypeError, "q_len: expected an int, received float"),
    (lambda s: s.block_layout(8, 8, 0, 4), ValueError, "block_q: expected an int > 0, received 0"),
    (lambda s: s.block_layout(8, 8, -1, 4), ValueError, "block_q: expected an int > 0, received -1"),
    (lambda s: s.block_layout(8, 8, 4, 0), ValueError, "block_k: expected an int > 0, received 0"),
    (lambda s: s.block_layout(-3, 8, 4, 4), ValueError, "q_len: expected an int >= 0, received -3"),
])
def test_methods_validate_lengths_and_blocks(spec, call, err, match):
    with pytest.raises(err, match=match):
        call(spec)


# ---------------------------------------------------------------------------------------------------------
# BigBird: structure checked against the definition (independent of layout_for), and the random draw
# ---------------------------------------------------------------------------------------------------------
def _bigbird_parts(layout, window, n_global):
    """Split a ``[n, n]`` BigBird layout into its window/global part (rebuilt from the definition with loops)
    and the extra (random) blocks."""
    n = layout.shape[-1]
    base = torch.tensor([[abs(r - c) <= window or r < n_global or c < n_global for c in range(n)] for r in range(n)],
                        dtype=torch.bool).view(n, n)
    return base, layout & ~base


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("window,n_global,n_random", [(0, 0, 1), (1, 1, 2), (2, 1, 3), (1, 2, 5)])
@pytest.mark.parametrize("n", [1, 4, 9, 23])
def test_bigbird_blocks_per_row(window, n_global, n_random, causal, n):
    lay = masks.bigbird(window, n_global, n_random, block=4, seed=11, causal=causal).layout_for(n)[0, 0]
    base, extra = _bigbird_parts(lay, window, n_global)
    assert bool((lay | ~base).all()), "a window or global block is missing"
    for r in range(n):
        cand = [c for c in range(n) if not base[r, c] and (c < r or not causal)]
        if r < n_global:
            assert int(extra[r].sum()) == 0  # a global row already sees every block
        else:
            assert int(extra[r].sum()) == min(n_random, len(cand)), (r, cand)
        chosen = extra[r].nonzero().flatten().tolist()
        assert set(chosen) <= set(cand), (r, chosen)  # never inside the window, the globals or (causal) the future


def test_bigbird_causal_rows_do_not_change_as_the_sequence_grows():
    full = masks.bigbird(1, 1, 3, block=4, seed=5, causal=True).layout_for(80)[0, 0]
    for m in (1, 2, 6, 17, 40, 79):
        # a fresh spec, so that nothing is shared through the per-length cache
        assert torch.equal(masks.bigbird(1, 1, 3, block=4, seed=5, causal=True).layout_for(m)[0, 0], full[:m, :m]), m
    assert not bool(torch.triu(full & ~_bigbird_parts(full, 1, 1)[0], 1).any())


def test_bigbird_same_seed_same_layout_and_seeds_differ():
    lay = masks.bigbird(1, 1, 2, block=4, seed=7).layout_for(40)
    assert torch.equal(lay, masks.bigbird(1, 1, 2, block=4, seed=7).layout_for(40))
    layouts = {tuple(masks.bigbird(1, 1, 2, block=4, seed=s).layout_for(16).flatten().tolist()) for s in range(50)}
    assert len(layouts) >= 45  # an affine hash gave ~half as many: many seeds shared one layout


def test_bigbird_random_blocks_are_spread():
    # with 2 random blocks per row, the gap between them should vary from row to row (an affine hash put most
    # rows at one fixed gap); over 62 rows of 61 candidates each no gap should cover 30% of the rows
    for seed in (0, 1, 2):
        lay = masks.bigbird(1, 1, 2, block=4, seed=seed).layout_for(64)[0, 0]
        _, extra = _bigbird_parts(lay, 1, 1)
        gaps = [int(cols[1] - cols[0]) for cols in (extra[r].nonzero().flatten() for r in range(1, 64))]
        assert len(gaps) == 63
        top = max(gaps.count(g) for g in set(gaps))
        assert top < 0.3 * len(gaps), (seed, sorted(gaps))  # torch.rand draws give 7% on average


def test_bigbird_layout_of_many_blocks():
    lay = masks.bigbird(1, 2, 3, block=64, seed=1, causal=True).layout_for(1024)  # T = 64K
    # rows 6.. have 3 window blocks (r - 1, r, r + 1), 2 globals and at least 3 past candidates for 3 random
    assert lay[0, 0, 6:-1].sum(-1).tolist() == [3 + 2 + 3] * (1024 - 7)


# ---------------------------------------------------------------------------------------------------------
# Zero lengths and validation
# ---------------------------------------------------------------------------------------------------------
ZERO_SPECS = {
    **SPECS,
    "bigbird": lambda: masks.bigbird(1, 1, 1, block=2),
    "block_sparse": lambda: masks.block_sparse(torch.ones(3, 3, dtype=torch.bool), block=2),
    "longformer": lambda: masks.longformer(2, [0]),
}


@pytest.mark.parametrize("q_len,kv_len", [(0, 0), (0, 5), (5, 0)])
@pytest.mark.parametrize("name", list(ZERO_SPECS))
def test_zero_lengths(name, q_len, kv_len):
    spec = ZERO_SPECS[name]()
    assert spec.dense(q_len, kv_len).shape[-2:] == (q_len, kv_len)
    assert spec.kept_pairs(q_len, kv_len) == 0
    layout = spec.block_layout(q_len, kv_len, 2, 2)
    assert layout.shape[-2:] == (-(-q_len // 2), -(-kv_len // 2))
    assert not bool((layout != EMPTY).any())


def test_empty_global_tokens_keep_nothing():
    spec = masks.global_tokens([])
    assert not bool(spec.dense(7, 9).any()) and spec.kept_pairs(7, 9) == 0
    assert not bool((spec.block_layout(7, 9, 2, 4) != EMPTY).any())
    window = masks.sliding_window(2)
    assert torch.equal((window | spec).dense(7, 9), window.dense(7, 9))
    assert masks.longformer(1, []).kept_pairs(9, 9) == masks.sliding_window(1, 1).kept_pairs(9, 9) == 9 + 2 * 8
    b, h, qi, ki = spec._index_grid(torch.arange(7)[:, None], torch.arange(9)[None, :], torch.device("cpu"))
    assert not bool(spec.mask_mod(7, 9)(b, h, qi, ki).any())


@pytest.mark.parametrize("q_len,kv_len", [(13, 29), (20, 11)])
def test_block_sparse_cross_attention(q_len, kv_len):
    # bottom-right alignment: query row i sits at position i + Tk - Tq and reads layout row (that position) // 5
    gen = torch.Generator().manual_seed(4)
    lay = torch.rand(2, 6, 6, generator=gen) > 0.4
    spec = masks.block_sparse(lay, block=5)
    off = kv_len - q_len
    ref = torch.tensor([[[bool(lay[h, (i + off) // 5, j // 5]) if i + off >= 0 else False for j in range(kv_len)]
                         for i in range(q_len)] for h in range(2)])
    assert torch.equal(spec.dense(q_len, kv_len)[0], ref)
    assert spec.kept_pairs(q_len, kv_len) == int(ref.sum())
    for bq, bk in [(4, 4), (3, 7)]:
        layout = spec.block_layout(q_len, kv_len, bq, bk)
        assert torch.equal(layout, MaskSpec.block_layout(spec, q_len, kv_len, bq, bk))
        for h in range(2):
            _check_layout(layout[0, h], ref[h], bq, bk)


def test_global_tokens_built_under_a_meta_default_device():
    # model skeletons (memory planner) build their mixers under torch.device("meta")
    with torch.device("meta"):
        spec = masks.longformer(4, [0, 3])
    assert torch.equal(spec.dense(9, 9), (masks.longformer(4, [0, 3])).dense(9, 9))
    assert spec.kept_pairs(9, 9) == int(masks.longformer(4, [0, 3]).dense(9, 9).sum())
