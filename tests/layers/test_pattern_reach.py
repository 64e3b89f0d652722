"""What the attention layers read from a pattern to size their caches and to evaluate it at token positions:
``MaskSpec.reach()`` (checked against the dense masks it summarises) and ``masks.at_positions``. Both live in
hybridattn.ops.masks; the layers in test_pattern_cache.py / test_pattern_padding.py use them."""

import pytest
import torch

from hybridattn.ops import masks
from hybridattn.ops.masks import Reach

N = 40
BLOCKS = torch.rand(10, 10, generator=torch.Generator().manual_seed(0)) < 0.3

# spec -> expected reach (lookback, pinned, relative, prefix_stable)
CASES = [
    (masks.sliding_window(5, 2), Reach(5, (), True, True)),
    (masks.dilated(8, 2), Reach(8, (), True, True)),
    (masks.dilated(8, 3), Reach(6, (), True, True)),  # the farthest kept distance
    (masks.strided(4), Reach(None, (), True, True)),
    (masks.causal(), Reach(None, (), True, True)),
    (masks.fixed(4, 1), Reach(None, (), False, True)),
    (masks.block_sparse(BLOCKS, 4), Reach(None, (), False, True)),
    (masks.bigbird(1, 1, 1, 4, causal=True), Reach(None, (), False, True)),
    (masks.bigbird(1, 1, 1, 4, causal=False), Reach(None, (), False, False)),
    (masks.global_tokens([7, 0]), Reach(7, (0, 7), False, True)),
    (masks.longformer(3, [0]) & masks.causal(), Reach(3, (0,), False, True)),
    (masks.longformer(3, [0, 9]), Reach(9, (0, 9), False, True)),
    (masks.global_tokens([0, 9]) & masks.sliding_window(2), Reach(2, (), False, True)),  # the smaller cache
    (masks.sliding_window(2) | masks.sliding_window(6), Reach(6, (), True, True)),
    (masks.sliding_window(2) | masks.strided(3), Reach(None, (), True, True)),
    (masks.fixed(4, 1) & masks.dilated(6, 2), Reach(6, (), False, True)),
    (masks.prefix_lm(3), Reach(None, (), False, True)),
    (masks.padding([N, N]), Reach(None, (), False, False)),
    (masks.document([0, 10, N]), Reach(None, (), False, False)),
    (masks.as_mask_spec(torch.ones(1, 1, N, N, dtype=torch.bool)), Reach(None, (), False, False)),
]


@pytest.mark.parametrize("spec,expected", CASES, ids=[repr(s)[:40] for s, _ in CASES])
def test_reach_matches_and_bounds_the_dense_mask(spec, expected):
    reach = spec.reach()
    assert reach == expected
    keep = spec.dense(N, N)[0, 0]
    p, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    causal_pairs = keep & (j <= p)
    if reach.lookback is not None:  # every kept causal pair is within the lookback or has a pinned key
        pinned = torch.isin(j, torch.tensor(reach.pinned, dtype=torch.long)).expand(N, N)
        assert not (causal_pairs & (p - j > reach.lookback) & ~pinned).any()
        assert (causal_pairs & (p - j == reach.lookback)).any()  # and the bound is tight
    if reach.relative:  # one value per diagonal
        for d in range(-N + 1, N):
            diagonal = keep.diagonal(-d)
            assert diagonal.all() or not diagonal.any()
    if reach.prefix_stable:
        for n in (7, 21, 33):
            assert torch.equal(spec.dense(n, n)[0, 0], keep[:n, :n])


def test_reach_combines_like_the_pairs_it_describes():
    a, b = Reach(4, (0,)), Reach(2, (), relative=True)
    assert a & b == Reach(2, (), False, True)  # A & B keeps a subset of each: the smaller cache suffices
    assert a | b == Reach(4, (0,), False, True)
    assert a | Reach() == Reach()  # one unbounded side: unbounded
    assert (a & Reach(prefix_stable=False)).prefix_stable is False
    assert a.slots() == 6 and Reach().slots() is None


def test_at_positions_evaluates_the_spec_at_each_rows_positions():
    spec = masks.longformer(1, [2]) & masks.causal()
    full = spec.dense(N, N)[0, 0]
    # row 0: keys at positions -2 (padding), -1, 0..5; row 1: pinned key 2, then positions 6..12
    k_pos = torch.tensor([[-2, -1, 0, 1, 2, 3, 4, 5], [2, 6, 7, 8, 9, 10, 11, 12]])
    q_pos = k_pos[:, -3:]
    got = masks.at_positions(spec, q_pos, k_pos, length=13)
    assert got.batch_size == 2 and got.reach() == spec.reach()
    dense = got.dense(3, 8)[:, 0]
    expected = full[q_pos[:, :, None].clamp(min=0), k_pos[:, None, :].clamp(min=0)] & (k_pos[:, None, :] >= 0)
    assert torch.equal(dense, expected)
    assert dense[1, :, 0].all()  # the pinned global key is seen from every later position
    assert got.kept_pairs(3, 8) == int(expected.sum())
    shared = masks.at_positions(spec, q_pos[:1], k_pos[:1], length=13)
    assert shared.batch_size is None  # positions shared by every row: no per-row mask


def test_at_positions_validation():
    pos = torch.arange(4)[None]
    with pytest.raises(TypeError, match="q_pos: expected a torch.Tensor"):
        masks.at_positions(masks.causal(), [0, 1], pos, length=4)
    with pytest.raises(ValueError, match="k_pos: expected 2 dimensions"):
        masks.at_positions(masks.causal(), pos, pos[0], length=4)
    with pytest.raises(ValueError, match="k_pos: expected batch size 2"):
        masks.at_positions(masks.causal(), pos.expand(2, 4), pos.expand(3, 4), length=4)
    with pytest.raises(ValueError, match="q_pos/k_pos: expected 2 query and 4 key positions"):
        masks.at_positions(masks.causal(), pos, pos, length=4).dense(2, 4)
