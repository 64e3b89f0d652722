import math

import pytest
import torch

from hybridattn.ops.positions import (
    ALiBi,
    alibi_slopes,
    apply_rotary,
    rope_frequencies,
    rotary_dim,
    sinusoidal_positions,
)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float, n_rot: int) -> torch.Tensor:
    """Pair-by-pair rotation in float64: channel i pairs with i + n_rot/2 (rotate_half layout)."""
    x = x.double().clone()
    out = x.clone()
    half = n_rot // 2
    pos = positions.double().expand(x.shape[0], x.shape[1])
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / n_rot)  # [B, T]
        c, s = angle.cos()[..., None], angle.sin()[..., None]  # [B, T, 1] against [B, T, H]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = b * c + a * s
    return out


@pytest.mark.parametrize("fraction,head_dim", [(1.0, 64), (0.25, 64), (0.5, 60), (1.0, 6)], ids=lambda v: str(v))
def test_rope_matches_pairwise_reference(fraction, head_dim):
    x = torch.randn(2, 7, 3, head_dim, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 3, 4, 5, 900, 901, 70000]])
    out = apply_rotary(x, pos, theta=500.0, rotary_fraction=fraction)
    ref = rope_reference(x, pos, 500.0, int(head_dim * fraction))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_rope_frequencies_are_hf_inv_freq():
    inv = rope_frequencies(128, theta=10000.0, rotary_fraction=0.25, dtype=torch.float64)
    expected = torch.tensor([1.0 / 10000.0 ** (2 * i / 32) for i in range(16)], dtype=torch.float64)
    torch.testing.assert_close(inv, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("fraction,head_dim", [(1.0, 100), (0.25, 72), (0.5, 100)], ids=lambda v: str(v))
def test_rope_preserves_norms_and_leaves_the_rest_untouched(fraction, head_dim):
    x = torch.randn(3, 11, 4, head_dim, dtype=torch.float64)
    out = apply_rotary(x, torch.arange(5, 16), theta=10000.0, rotary_fraction=fraction)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    n = int(head_dim * fraction)
    torch.testing.assert_close(out[..., :n].norm(dim=-1), x[..., :n].norm(dim=-1), rtol=1e-12, atol=0)
    assert torch.equal(out[..., n:], x[..., n:])
    assert (out[..., :n] - x[..., :n]).abs().max() > 1e-3  # and the rotated part did move


def test_rope_dot_product_depends_only_on_offset():
    q = torch.randn(1, 1, 2, 64, dtype=torch.float64)
    k = torch.randn(1, 1, 2, 64, dtype=torch.float64)

    def dot(m: int, n: int) -> torch.Tensor:
        qm = apply_rotary(q, torch.tensor([m]), rotary_fraction=0.5)
        kn = apply_rotary(k, torch.tensor([n]), rotary_fraction=0.5)
        return (qm * kn).sum(-1)

    for m, n in [(5, 2), (17, 0), (100, 120), (3, 3)]:
        for shift in (1, 37, 4096):
            torch.testing.assert_close(dot(m + shift, n + shift), dot(m, n), rtol=1e-10, atol=1e-10)
    # and it does depend on the offset
    assert (dot(5, 2) - dot(5, 3)).abs().max() > 1e-3


def test_rope_per_row_positions_equal_separate_calls_and_zero_is_identity():
    x = torch.randn(2, 5, 3, 16)
    pos = torch.tensor([[0, 0, 0, 1, 2], [7, 8, 9, 10, 11]])
    both = apply_rotary(x, pos)
    for row in range(2):
        # the sin/cos tables have other shapes (vector body vs scalar tail): fp32 tolerance
        torch.testing.assert_close(both[row : row + 1], apply_rotary(x[row : row + 1], pos[row]))
    torch.testing.assert_close(both[0, :3], x[0, :3], rtol=1e-6, atol=1e-6)


def test_rope_low_precision_matches_float32_then_cast():
    x = torch.randn(2, 9, 2, 32, dtype=torch.bfloat16)
    pos = torch.arange(9) * 1000
    out = apply_rotary(x, pos)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, apply_rotary(x.float(), pos).to(torch.bfloat16), rtol=0, atol=0)


def test_rope_validation():
    x = torch.randn(2, 5, 3, 16)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(x, torch.arange(4))
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(x, torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="positions"):
        apply_rotary(x, torch.arange(5.0))
    with pytest.raises(ValueError, match="rotary_fraction"):
        apply_rotary(x, torch.arange(5), rotary_fraction=0.1)  # 1.6 -> 1 channel, odd
    with pytest.raises(ValueError, match="rotary_fraction"):
        rotary_dim(16, 1.5)
    with pytest.raises(ValueError, match="x"):
        apply_rotary(torch.randn(5, 3, 16), torch.arange(5))


def test_sinusoidal_matches_the_formula():
    pos = torch.tensor([0, 1, 5, 1234])
    out = sinusoidal_positions(pos, 10, dtype=torch.float64)
    for a, p in enumerate(pos.tolist()):
        for i in range(5):
            w = p / 10000.0 ** (2 * i / 10)
            assert out[a, 2 * i].item() == pytest.approx(math.sin(w), abs=1e-12)
            assert out[a, 2 * i + 1].item() == pytest.approx(math.cos(w), abs=1e-12)
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_positions(pos, 7)


# -- ALiBi ---------------------------------------------------------------------------------------------------


def test_alibi_slopes_match_the_paper():
    # 8 heads: 1/2, 1/4, ..., 1/256 (Press et al., 2022, section 3)
    expected8 = [2.0**-i for i in range(1, 9)]
    torch.testing.assert_close(alibi_slopes(8, dtype=torch.float64), torch.tensor(expected8, dtype=torch.float64))
    # non-power-of-two: the 4-head slopes, then every other slope of the 8-head sequence
    expected6 = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6, dtype=torch.float64), torch.tensor(expected6, dtype=torch.float64))
    expected12 = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(alibi_slopes(12, dtype=torch.float64), torch.tensor(expected12, dtype=torch.float64))


def alibi_reference(slopes, q_len, kv_len, causal):
    out = torch.zeros(1, len(slopes), q_len, kv_len, dtype=torch.float64)
    for h, m in enumerate(slopes.tolist()):
        for i in range(q_len):
            for j in range(kv_len):
                d = i + kv_len - q_len - j
                out[0, h, i, j] = -m * (max(d, 0) if causal else abs(d))
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("q_len,kv_len", [(7, 7), (3, 10), (1, 9)])
def test_alibi_dense_block_and_score_mod_agree_with_reference(causal, q_len, kv_len):
    bias = ALiBi(5, causal=causal)
    ref = alibi_reference(alibi_slopes(5, dtype=torch.float64), q_len, kv_len, causal)
    torch.testing.assert_close(bias.dense(q_len, kv_len, dtype=torch.float64), ref, rtol=1e-12, atol=0)
    qi, ki = torch.arange(1, q_len, 2), torch.arange(kv_len - 1, -1, -3)
    blk = bias.block(q_len, kv_len, qi, ki, dtype=torch.float64)
    torch.testing.assert_close(blk, ref[:, :, qi][:, :, :, ki], rtol=1e-12, atol=0)
    h = torch.arange(5).view(1, 5, 1, 1)
    q = torch.arange(q_len).view(1, 1, q_len, 1)
    k = torch.arange(kv_len).view(1, 1, 1, kv_len)
    scores = torch.zeros(1, 5, q_len, kv_len, dtype=torch.float64)
    modded = bias.score_mod(q_len, kv_len)(scores, torch.zeros(1, 1, 1, 1, dtype=torch.long), h, q, k)
    torch.testing.assert_close(modded, ref, rtol=1e-12, atol=0)


def test_alibi_validation():
    with pytest.raises(ValueError, match="slopes"):
        ALiBi(4, slopes=torch.ones(3))
    with pytest.raises(ValueError, match="num_heads"):
        ALiBi()
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


def _has_backend(name):
    try:
        from hybridattn.ops.softmax_attention import softmax_attention
    except ImportError:
        return False
    q = torch.randn(1, 2, 1, 4)
    try:
        softmax_attention(q, q, q, backend=name)
    except (ValueError, NotImplementedError, ImportError):  # tiled lands in its own module, maybe later
        return False
    return True


@pytest.mark.parametrize("backend", ["tiled", "sdpa"])
@pytest.mark.parametrize("causal,q_len,kv_len", [(True, 63, 63), (True, 5, 70), (False, 33, 17)])
def test_alibi_through_backend_equals_naive(backend, causal, q_len, kv_len):
    if not _has_backend(backend):
        pytest.skip(f"softmax_attention backend {backend!r} not available yet")
    from hybridattn.ops.softmax_attention import softmax_attention

    q = torch.randn(2, q_len, 6, 20, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_len, 3, 20, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_len, 3, 20, dtype=torch.float64, requires_grad=True)
    bias = ALiBi(6, causal=causal)
    outs, grads = [], []
    for name in ("naive", backend):
        o = softmax_attention(q, k, v, causal=causal, bias=bias, backend=name)
        do = torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(1))
        grads.append(torch.autograd.grad(o, (q, k, v), do))
        outs.append(o)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-10)


@pytest.mark.slow  # the first flex_attention call costs ~10 s of set-up on the CPU
@pytest.mark.parametrize("causal", [True, False])
def test_alibi_score_mod_runs_in_flex_attention(causal):
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (torch.randn(2, 6, n, 8, dtype=torch.float64) for n in (5, 9, 9))  # flex layout [B, H, T, D]
    bias = ALiBi(6, causal=causal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": the unfused path is what we test here
        out = flex_attention(q, k, v, score_mod=bias.score_mod(5, 9))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + bias.dense(5, 9, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(out, weights @ v, rtol=1e-10, atol=1e-10)
