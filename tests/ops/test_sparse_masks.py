"""Sparse mask specs: every closed form (kept pairs, block layout) against the dense mask it describes."""

import pytest
import torch

from hybridattn.ops import masks
from hybridattn.ops.masks import EMPTY, FULL, MaskSpec


def _reference_mask(spec_name, q_len, kv_len):
    """The same patterns written as plain loops over positions, independent of the spec classes."""
    off = kv_len - q_len
    out = torch.zeros(q_len, kv_len, dtype=torch.bool)
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
])
def test_validation_names_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()
