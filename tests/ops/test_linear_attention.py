"""linear_attention: every feature map, with and without normalisation, every form against the float64 token
loop (outputs, final states, gradients of every input); the normaliser against a hand computation; zero
denominators; varlen, prefill + decode, long sequences, bf16 and validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridattn.ops import FavorPlusFeatures, linear_attention

# Every test runs with the compiled CPU kernel (ops/csrc) and with the pure-PyTorch forms.
pytestmark = pytest.mark.usefixtures("kernel")

B, T, HK, HV, DK, DV, C = 2, 63, 2, 4, 12, 10, 16


def squared_plus_one(x):  # a user's own map, with a feature dim different from Dk
    return torch.cat([x * x, torch.ones_like(x[..., :1])], dim=-1)


FEATURE_MAPS = {
    "identity": ("identity", DK),
    "relu": ("relu", DK),
    "elu+1": ("elu+1", DK),
    "taylor": ("taylor", 1 + DK + DK * DK),
    "favor+": (FavorPlusFeatures(DK, 20, seed=3), 20),
    "callable": (squared_plus_one, DK + 1),
}


def make_inputs(b=B, t=T, hk=HK, hv=HV, dk=DK, dv=DV, *, features=DK, normalize=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, hk, dk, generator=gen, dtype=torch.float64) * 0.5 for _ in range(2))
    v = torch.randn(b, t, hv, dv, generator=gen, dtype=torch.float64)
    # a positive initial normaliser keeps the denominators away from zero
    h0 = torch.rand(b, hv, features, dv + normalize, generator=gen, dtype=torch.float64)
    return (q, k, v), h0


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("name", list(FEATURE_MAPS))
def test_forms_match_float64(forms, name, normalize):
    if name == "identity" and normalize:
        pytest.skip("q . sum k changes sign: the normaliser is only meaningful for positive feature maps")
    feature_map, m = FEATURE_MAPS[name]
    args, h0 = make_inputs(features=m, normalize=normalize)
    forms.check(linear_attention, args, initial_state=h0, modes=("chunk", "parallel"), chunk_size=C,
                feature_map=feature_map, normalize=normalize)


@pytest.mark.parametrize("name, normalize", [("identity", False), ("elu+1", True)])
def test_forms_match_in_float32(forms, name, normalize):
    feature_map, m = FEATURE_MAPS[name]
    args, h0 = make_inputs(features=m, normalize=normalize)
    forms.check(linear_attention, args, initial_state=h0, dtype=torch.float32, tol=1e-5, chunk_size=C,
                feature_map=feature_map, normalize=normalize)


def test_normalizer_by_hand():
    """``o_t = sum_j (phi(q_t) . phi(k_j)) v_j / sum_j phi(q_t) . phi(k_j)`` over ``j <= t`` plus the initial
    ``[S0 | z0]``, and the final state's last column is ``z0 + sum_j phi(k_j)``."""
    (q, k, v), h0 = make_inputs(1, 7, 1, 1, 4, 3, features=4, normalize=True)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    expected = torch.empty_like(v)
    for t in range(7):
        num = fq[0, t, 0] @ h0[0, 0, :, :3]
        den = fq[0, t, 0] @ h0[0, 0, :, 3]
        for j in range(t + 1):
            w = fq[0, t, 0] @ fk[0, j, 0]
            num, den = num + w * v[0, j, 0], den + w
        expected[0, t, 0] = num / den
    for mode in ("chunk", "parallel", "recurrent"):
        o, s = linear_attention(q, k, v, feature_map="elu+1", normalize=True, initial_state=h0,
                                output_final_state=True, mode=mode, chunk_size=4)
        torch.testing.assert_close(o, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s[0, 0, :, 3], h0[0, 0, :, 3] + fk[0, :, 0].sum(0), rtol=1e-12, atol=1e-12)


def test_zero_denominator_gives_zero_not_nan():
    (q, k, v), _ = make_inputs(1, 20, 1, 1, 4, 3)
    q = -q.abs() - 0.1  # relu(q) = 0: every denominator is 0
    q.requires_grad_()
    for mode in ("chunk", "parallel", "recurrent"):
        o, _ = linear_attention(q, k, v, feature_map="relu", normalize=True, mode=mode)
        assert (o == 0).all()
        (grad,) = torch.autograd.grad(o.sum(), q)
        assert torch.isfinite(grad).all()


def test_normalized_attention_rows_sum_to_one(forms):
    args, _ = make_inputs(2, 30, 1, 2)
    attention = forms.attention_matrix(linear_attention, args, feature_map="elu+1", normalize=True)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, 30, dtype=torch.float64))
    assert (attention >= 0).all()


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_prefill_then_decode(forms, normalize):
    (q, k, v), _ = make_inputs(2, 45, 1, 2, 10, 7)
    forms.prefill_then_decode(linear_attention, (q, k, v), split=37, chunk_size=16, feature_map="elu+1",
                              normalize=normalize)


def test_varlen_matches_per_sequence_calls(forms):
    (q, k, v), _ = make_inputs(1, 70, 2, 2, 9, 6)
    cu = torch.tensor([0, 5, 5, 40, 70])
    h0 = torch.rand(4, 2, 9, 7, dtype=torch.float64)
    forms.varlen(linear_attention, (q, k, v), cu, initial_state=h0, chunk_size=16, feature_map="elu+1",
                 normalize=True)


def test_long_sequence(forms):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 16_384, 2, 8, generator=gen) for _ in range(2))
    v = torch.randn(1, 16_384, 2, 4, generator=gen)
    o, s = linear_attention(q, k, v, feature_map="elu+1", normalize=True, output_final_state=True)
    o_ref, s_ref = linear_attention(q.double(), k.double(), v.double(), feature_map="elu+1", normalize=True,
                                    output_final_state=True, mode="recurrent")
    assert forms.rel_err(o, o_ref) <= 1e-5 and forms.rel_err(s, s_ref) <= 1e-5


def test_bfloat16_within_tolerance_of_float32(forms):
    args, h0 = make_inputs(1, 90, 2, 2, 16, 16, features=16, normalize=True)
    forms.bfloat16(linear_attention, args, h0, feature_map="elu+1", normalize=True)


def test_validation_errors():
    (q, k, v), h0 = make_inputs()
    with pytest.raises(ValueError, match="feature_map: expected one of"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="FavorPlusFeatures"):
        linear_attention(q, k, v, feature_map="favor+")
    with pytest.raises(TypeError, match="feature_map: expected a name"):
        linear_attention(q, k, v, feature_map=3)
    with pytest.raises(ValueError, match=r"feature_map\(q\): expected shape"):
        linear_attention(q, k, v, feature_map=lambda x: x[0])
    with pytest.raises(ValueError, match="initial_state: expected shape"):
        linear_attention(q, k, v, normalize=True, initial_state=h0)  # needs Dv + 1 columns
    with pytest.raises(ValueError, match="expected last dimension head_dim=16"):
        linear_attention(q, k, v, feature_map=FavorPlusFeatures(16, 8))
