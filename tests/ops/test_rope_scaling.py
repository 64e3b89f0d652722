"""RoPE scaling (linear, dynamic NTK, YaRN, Llama 3, LongRoPE): inverse frequencies and attention scale against
transformers' ``ROPE_INIT_FUNCTIONS``, on partial and odd-pair rotary widths."""

import math

import pytest
import torch

from hybridattn.ops.positions import (
    ROPE_SCALING,
    apply_rotary,
    check_rope_scaling,
    rope_frequencies,
    rope_scaled_frequencies,
)

MAX_LEN = 64  # transformers' max_position_embeddings in these configs

# (head_dim, partial_rotary_factor): rotary widths 4 (Qwen3-Next's 25%), 10 and 18 (an odd number of pairs), 24
SHAPES = [(16, 0.25), (20, 0.5), (36, 0.5), (24, 1.0)]


def _params(rope_type: str, pairs: int) -> dict:
    """A scaling of each type, with non-default optional fields where the type has them."""
    return {
        "linear": {"factor": 2.5},
        "dynamic": {"factor": 3.0},
        "yarn": {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 24.0, "beta_slow": 2.0},
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16},
        "longrope": {"original_max_position_embeddings": 16, "short_factor": [1.0 + 0.1 * i for i in range(pairs)],
                     "long_factor": [2.0 + 0.5 * i for i in range(pairs)]},
    }[rope_type]


def _ours(params: dict, rope_type: str) -> dict:
    """The hybridattn scaling dict of a transformers ``rope_parameters`` (what the Qwen3-Next import does)."""
    ours = {"rope_type": rope_type, **params}
    if rope_type == "dynamic":
        ours["original_max_position_embeddings"] = MAX_LEN  # transformers scales past max_position_embeddings
    if rope_type == "longrope":
        ours["factor"] = MAX_LEN / params["original_max_position_embeddings"]
    return ours


def _transformers(rope_type, head_dim, fraction, params, seq_len):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.Qwen3NextConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=MAX_LEN,
        rope_parameters={"rope_type": rope_type, "rope_theta": 5000.0, "partial_rotary_factor": fraction, **params})
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)


@pytest.mark.needs_transformers
@pytest.mark.parametrize("head_dim,fraction", SHAPES, ids=[f"D{d}-f{f}" for d, f in SHAPES])
@pytest.mark.parametrize("rope_type", sorted(ROPE_SCALING))
@pytest.mark.parametrize("seq_len", [None, 40, 200], ids=["L-none", "L40", "L200"])
def test_frequencies_match_transformers(rope_type, head_dim, fraction, seq_len):
    n = int(head_dim * fraction)
    params = _params(rope_type, n // 2)
    want, want_scale = _transformers(rope_type, head_dim, fraction, params, seq_len)
    scaling = check_rope_scaling(_ours(params, rope_type), rotary_dim=n)
    got, scale = rope_scaled_frequencies(head_dim, theta=5000.0, rotary_fraction=fraction, scaling=scaling,
                                         seq_len=seq_len)
    torch.testing.assert_close(got, want.float(), rtol=2e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)


@pytest.mark.needs_transformers
@pytest.mark.parametrize("params", [
    {"factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 0.7},
    {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.8, "mscale_all_dim": 0.5},
    {"factor": 40.0, "original_max_position_embeddings": 16, "truncate": False},
    {"factor": 1.0, "original_max_position_embeddings": 16},
], ids=["attention_factor", "mscale", "no-truncate", "factor-1"])
def test_yarn_options_match_transformers(params):
    want, want_scale = _transformers("yarn", 20, 0.5, params, None)
    got, scale = rope_scaled_frequencies(20, theta=5000.0, rotary_fraction=0.5,
                                         scaling=check_rope_scaling({"rope_type": "yarn", **params}))
    torch.testing.assert_close(got, want.float(), rtol=2e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_as_tensor_equals_length_as_int(rope_type):
    scaling = _ours(_params(rope_type, 5), rope_type)
    for length in (10, 16, 17, 64, 65, 300):
        a, _ = rope_scaled_frequencies(20, theta=5000.0, rotary_fraction=0.5, scaling=scaling, seq_len=length)
        b, _ = rope_scaled_frequencies(20, theta=5000.0, rotary_fraction=0.5, scaling=scaling,
                                       seq_len=torch.tensor(length))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_dynamic_is_plain_rope_within_the_trained_length():
    scaling = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 32}
    plain = rope_frequencies(16, theta=1e4)
    for length in (None, 1, 32):
        got, _ = rope_scaled_frequencies(16, theta=1e4, scaling=scaling, seq_len=length)
        torch.testing.assert_close(got, plain, rtol=1e-6, atol=0)
    longer, _ = rope_scaled_frequencies(16, theta=1e4, scaling=scaling, seq_len=33)
    assert (longer[1:] < plain[1:]).all() and longer[0] == plain[0]


def test_apply_rotary_scales_the_rotated_channels_only():
    """cos and sin carry the attention scale (YaRN's temperature); channels past the rotary width do not."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64)
    pos = torch.arange(7)
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4, "attention_factor": 1.5}
    got = apply_rotary(x, pos, theta=100.0, rotary_fraction=0.5, scaling=scaling)
    inv_freq, _ = rope_scaled_frequencies(16, theta=100.0, rotary_fraction=0.5, scaling=scaling,
                                          dtype=torch.float64)
    angle = pos[:, None].double() * inv_freq  # [T, 4]
    c, s = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    a, b = x[..., :4], x[..., 4:8]
    want = torch.cat((1.5 * (a * c - b * s), 1.5 * (b * c + a * s), x[..., 8:]), dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_plain_rope_is_unchanged_by_a_default_scaling():
    assert check_rope_scaling({"rope_type": "default"}) is None
    assert check_rope_scaling(None) is None


@pytest.mark.parametrize("scaling,error,match", [
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, ValueError,
     r"rope_scaling.rope_type: expected one of \('linear', 'dynamic', 'yarn', 'llama3', 'longrope'\), "
     r"received 'ntk-by-parts'"),
    ({"rope_type": "yarn", "factor": 2.0}, ValueError, r"'yarn' expects \['factor', 'original_max_position_emb"),
    ({"rope_type": "linear", "factor": 2.0, "beta": 1}, ValueError, r"received \['beta', 'factor'\]"),
    ({"rope_type": "linear", "factor": -2.0}, ValueError, r"rope_scaling.factor: expected a positive number"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "truncate": 1}, TypeError,
     r"rope_scaling.truncate: expected a bool"),
    ({"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": 8, "short_factor": [1.0],
      "long_factor": [1.0]}, ValueError, r"rope_scaling.short_factor: expected 2 entries \(rotary_dim / 2\), "
                                         r"received 1"),
    ([("rope_type", "linear")], TypeError, r"rope_scaling: expected None or a dict"),
])
def test_bad_scalings_are_named(scaling, error, match):
    with pytest.raises(error, match=match):
        check_rope_scaling(scaling, rotary_dim=4)


def test_dynamic_needs_more_than_two_rotated_channels():
    with pytest.raises(ValueError, match="dim: dynamic NTK scaling needs more than 2 rotated channels, received 2"):
        rope_scaled_frequencies(8, rotary_fraction=0.25, seq_len=100,
                                scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4})


def test_yarn_attention_scale_formula():
    from hybridattn.ops.positions import yarn_attention_scale

    assert yarn_attention_scale(4.0) == pytest.approx(0.1 * math.log(4.0) + 1)
    assert yarn_attention_scale(0.5) == 1.0
    assert yarn_attention_scale(4.0, mscale=1.0, mscale_all_dim=1.0) == pytest.approx(1.0)
