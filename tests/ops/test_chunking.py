"""The streaming chunk forms' helpers: flushed decays are exp where it matters and exact zeros below 1e-26."""

from __future__ import annotations

import math

import torch

from hybridattn.ops._chunking import FLUSH_LOG_DECAY, decay_matrix, exp_flushed


def test_exp_flushed_is_exp_above_the_floor_and_zero_below():
    x = torch.tensor([3.0, 0.0, -1.5, -59.9, -60.0, -60.1, -1000.0, -math.inf], dtype=torch.float64,
                     requires_grad=True)
    y = exp_flushed(x)
    above = x.detach() > FLUSH_LOG_DECAY
    assert torch.equal(y[above], x.detach()[above].exp())
    assert torch.equal(y[~above], torch.zeros(int((~above).sum()), dtype=torch.float64))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad[above], x.detach()[above].exp()) and torch.equal(grad[~above], torch.zeros_like(grad[~above]))


def test_decay_matrix_is_the_masked_flushed_exponential_of_differences():
    gen = torch.Generator().manual_seed(0)
    # cumulative log-decays with fast and slow heads, and one growing (positive g) head
    g = torch.cat([-torch.rand(2, 17, 1, generator=gen, dtype=torch.float64) * 9,
                   torch.rand(1, 17, 1, generator=gen, dtype=torch.float64)])
    gam = g.cumsum(1)
    mask = torch.ones(17, 17, dtype=torch.float64).tril()
    diff = gam - gam.mT
    want = torch.where((diff > FLUSH_LOG_DECAY) & mask.bool(), diff.clamp(max=50).exp(), 0.0)
    got = decay_matrix(gam, mask)
    torch.testing.assert_close(got, want, rtol=4e-16, atol=0)  # exp of the same float64 values in other kernels
    assert (got[:2] == 0).any() and (got[:2].tril() > 0).any()  # both branches are exercised


def test_chunk_layout_decay_fast_path_equals_decay_matrix():
    """Mild decays take L = G_i / G_j; it must equal the general flushed form (to rounding)."""
    from hybridattn.ops._chunking import ChunkLayout

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 50, 3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    for g, fast in ((-torch.rand(2, 50, 3, generator=gen, dtype=torch.float64), True),
                    (-20.0 * torch.rand(2, 50, 3, generator=gen, dtype=torch.float64), False)):
        layout = ChunkLayout(q, k, v, g, 16)
        assert (layout.inv_gexp is not None) == fast
        for i in range(layout.n):
            lo, hi = layout.bounds(i)
            want = decay_matrix(layout.gam[i, :, : hi - lo], layout.mask[: hi - lo, : hi - lo])
            assert (layout(i)[-1] - want).abs().max().item() <= 1e-14
