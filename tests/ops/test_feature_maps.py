"""Feature maps: closed forms (Based's Taylor map), FAVOR+ (orthogonality, seeds, redraws, and its estimate of
softmax attention improving as features are added)."""

from __future__ import annotations

import math

import pytest
import torch

from hybridattn.ops import FavorPlusFeatures, linear_attention
from hybridattn.ops.feature_maps import elu_plus_one_features, resolve_feature_map, taylor_features


def test_taylor_kernel_is_second_order_exp():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 5, 2, 7, generator=gen, dtype=torch.float64) for _ in range(2))
    s = (q * k).sum(-1) / math.sqrt(7)
    kernel = (taylor_features(q) * taylor_features(k)).sum(-1)
    assert taylor_features(q).shape == (3, 5, 2, 1 + 7 + 49)
    torch.testing.assert_close(kernel, 1 + s + s * s / 2, rtol=1e-12, atol=1e-12)


def test_elu_plus_one_values():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64)
    expected = torch.where(x < 0, x.exp(), x + 1)
    torch.testing.assert_close(elu_plus_one_features(x), expected, rtol=0, atol=1e-15)
    assert resolve_feature_map("elu+1") is elu_plus_one_features


def test_favor_orthogonal_blocks_and_norms():
    fm = FavorPlusFeatures(8, 20, seed=1)
    w = fm.projection
    assert w.shape == (20, 8)
    for block in (w[:8], w[8:16]):  # each full block: mutually orthogonal rows
        unit = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    # chi(8)-distributed norms, not all 1 (orthonormal rows alone would bias the estimator)
    assert (w.norm(dim=1) - 1).abs().max() > 0.1


def test_favor_seed_and_redraw():
    a, b = FavorPlusFeatures(6, 12, seed=5), FavorPlusFeatures(6, 12, seed=5)
    assert torch.equal(a.projection, b.projection)
    first = a.projection.clone()
    a.redraw()
    assert a.seed == 6 and not torch.allclose(a.projection, first)
    a.redraw(seed=5)
    assert torch.equal(a.projection, first)
    assert not torch.allclose(FavorPlusFeatures(6, 12, seed=5, orthogonal=False).projection, first)


def causal_softmax_attention(q, k, v):
    t = q.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "iid"])
def test_favor_approximates_softmax_better_with_more_features(orthogonal):
    """Normalised FAVOR+ linear attention estimates causal softmax attention; its error shrinks towards
    1/sqrt(M) (16x from M = 16 to 4096 asymptotically, ~5x measured in this pre-asymptotic range), so it must
    fall at every step of M = 16, 64, 256, 1024, 4096 (mean over seeds) and by > 4x overall."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 32, 2, 16, generator=gen, dtype=torch.float64) * 0.6 for _ in range(2))
    v = torch.randn(2, 32, 2, 8, generator=gen, dtype=torch.float64)
    exact = causal_softmax_attention(q, k, v)
    errors = []
    for m in (16, 64, 256, 1024, 4096):
        err = 0.0
        for seed in range(4):
            fm = FavorPlusFeatures(16, m, seed=seed, orthogonal=orthogonal)
            o, _ = linear_attention(q, k, v, feature_map=fm, normalize=True)
            err += ((o - exact).norm() / exact.norm()).item() / 4
        errors.append(err)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 4, errors


def test_favor_validation():
    with pytest.raises(ValueError, match="num_features: expected an int > 0"):
        FavorPlusFeatures(8, 0)
    with pytest.raises(TypeError, match="head_dim: expected an int"):
        FavorPlusFeatures(8.0, 4)
    with pytest.raises(ValueError, match="seed: expected an int >= 0"):
        FavorPlusFeatures(8, 4).redraw(seed=-1)
