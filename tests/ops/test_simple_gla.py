"""simple_gla (scalar decay per head and token, Mamba2/SSD-style) and retention (RetNet's constant decays): every
form against the float64 token loop, outputs, final states and gradients of every input; hand-written sums,
varlen, prefill + decode, stress gates, long sequences, bf16."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
import pytest
import torch
import torch.nn.functional as F

from hybridattn.ops import retention, simple_gla

# Every test runs with the compiled CPU kernel (ops/csrc) and with the pure-PyTorch forms.
pytestmark = pytest.mark.usefixtures("kernel")

# (B, T, Hk, Hv, Dk, Dv, chunk_size)
SHAPES = [
    (1, 1, 1, 1, 8, 8, 16),
    (2, 63, 2, 4, 12, 10, 16),
    (1, 100, 1, 1, 24, 20, 32),
    (1, 500, 1, 3, 17, 9, 64),
]


def shape_id(shape):
    b, t, hk, hv, dk, dv, c = shape
    return f"B{b}-T{t}-H{hk}x{hv}-Dk{dk}-Dv{dv}-C{c}"


def make_inputs(b, t, hk, hv, dk, dv, *, gates="decay", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, hk, dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, t, hv, dv, generator=gen, dtype=torch.float64)
    h0 = torch.randn(b, hv, dk, dv, generator=gen, dtype=torch.float64)
    x = torch.randn(b, t, hv, generator=gen, dtype=torch.float64)
    g = {"decay": F.logsigmoid(x + 1.0), "zero": torch.zeros_like(x),
         "strong": -20.0 - 40.0 * torch.rand(b, t, hv, generator=gen, dtype=torch.float64)}[gates]
    return (q, k, v, g), h0


@pytest.mark.parametrize(
    "shape, gates",
    [pytest.param(s, g, id=f"{shape_id(s)}-{g}", marks=[pytest.mark.slow] if s[1] >= 500 and g != "decay" else [])
     for s in SHAPES for g in ("decay", "zero", "strong")],
)
def test_forms_match_float64(forms, shape, gates):
    *dims, c = shape
    args, h0 = make_inputs(*dims, gates=gates)
    forms.check(simple_gla, args, initial_state=h0, modes=("chunk", "parallel"), chunk_size=c)


@pytest.mark.parametrize("gates", ["decay", "strong"])
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=shape_id)
def test_forms_match_in_float32(forms, shape, gates):
    *dims, c = shape
    args, h0 = make_inputs(*dims, gates=gates)
    forms.check(simple_gla, args, initial_state=h0, dtype=torch.float32, tol=1e-5, chunk_size=c)


@pytest.mark.slow
def test_forms_match_float64_t1000(forms):
    args, h0 = make_inputs(1, 1000, 2, 4, 20, 12)
    forms.check(simple_gla, args, initial_state=h0, modes=("chunk", "parallel"), chunk_size=64)


def test_mamba2_ssd_sum_with_shared_groups():
    """SSD: ``y_t = sum_{j<=t} (C_t . B_j) exp(a_{j+1} + .. + a_t) x_j`` with B, C shared by all heads of a group
    (here one group, 3 heads): q = C, k = B, v = x, g = a, scale = 1."""
    (c_, b_, x, a), _ = make_inputs(1, 11, 1, 3, 4, 2)
    expected = torch.zeros_like(x)
    for h in range(3):
        for t in range(11):
            for j in range(t + 1):
                decay = a[0, j + 1:t + 1, h].sum().exp()
                expected[0, t, h] += (c_[0, t, 0] @ b_[0, j, 0]) * decay * x[0, j, h]
    for mode in ("chunk", "parallel", "recurrent"):
        y, _ = simple_gla(c_, b_, x, a, scale=1.0, mode=mode, chunk_size=4)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_retention_decays_and_sum():
    """RetNet: ``gamma_h = 1 - 2^(-5-h)`` and ``o_t = scale sum_{j<=t} gamma_h^(t-j) (q_t . k_j) v_j``."""
    (q, k, v, _), h0 = make_inputs(2, 13, 2, 2, 6, 5)
    gamma = 1 - 2.0 ** (-5 - torch.arange(2, dtype=torch.float64))
    scale = 6 ** -0.5
    expected = torch.zeros_like(v)
    for t in range(13):
        for j in range(t + 1):
            w = gamma ** (t - j) * scale * (q[:, t] * k[:, j]).sum(-1)  # [B, H]
            expected[:, t] += w[..., None] * v[:, j]
    for mode in ("chunk", "parallel", "recurrent"):
        o, _ = retention(q, k, v, mode=mode, chunk_size=8)
        torch.testing.assert_close(o, expected, rtol=1e-12, atol=1e-12)


def test_retention_forms_and_gradients(forms):
    args, h0 = make_inputs(1, 70, 2, 2, 10, 6)
    forms.check(retention, args[:3], initial_state=h0, chunk_size=32)


def test_returned_attention_reproduces_output(forms):
    args, _ = make_inputs(2, 37, 1, 3, 6, 5)
    forms.attention_matrix(simple_gla, args)


def test_prefill_then_decode(forms):
    args, _ = make_inputs(2, 45, 1, 2, 10, 7)
    forms.prefill_then_decode(simple_gla, args, split=37, chunk_size=16)


def test_varlen_matches_per_sequence_calls(forms):
    args, _ = make_inputs(1, 70, 2, 2, 9, 6)
    cu = torch.tensor([0, 5, 5, 40, 70], dtype=torch.int32)
    h0 = torch.randn(4, 2, 9, 6, dtype=torch.float64)
    forms.varlen(simple_gla, args, cu, initial_state=h0, chunk_size=16)


@pytest.mark.parametrize("t", [16_384, pytest.param(131_072, marks=pytest.mark.slow)])
def test_long_sequence_stays_finite_and_exact(forms, t):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, t, 2, 8, generator=gen) for _ in range(2))
    v = torch.randn(1, t, 2, 4, generator=gen)
    g = F.logsigmoid(torch.randn(1, t, 2, generator=gen))
    o, s = simple_gla(q, k, v, g, output_final_state=True, mode="chunk")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    o_ref, s_ref = simple_gla(*(x.double() for x in (q, k, v, g)), output_final_state=True, mode="recurrent")
    assert forms.rel_err(o, o_ref) <= 1e-5
    assert forms.rel_err(s, s_ref) <= 1e-5


def test_bfloat16_within_tolerance_of_float32(forms):
    args, h0 = make_inputs(1, 90, 2, 2, 16, 16)
    forms.bfloat16(simple_gla, args, h0)


def test_validation_errors():
    (q, k, v, g), _ = make_inputs(2, 8, 2, 4, 6, 5)
    with pytest.raises(ValueError, match=r"g: expected shape \(2, 8, 4\)"):
        simple_gla(q, k, v, g[..., None].expand(-1, -1, -1, 6))
    with pytest.raises(ValueError, match="g: expected log-decays <= 0"):
        simple_gla(q, k, v, g.abs() + 0.1)
    with pytest.raises(TypeError, match="g: expected a torch.Tensor"):
        simple_gla(q, k, v, 0.5)
    with pytest.raises(TypeError, match="scale: expected a float"):
        simple_gla(q, k, v, g, scale="1")
    with pytest.raises(ValueError, match="v: expected batch and length"):
        retention(q, k, v[:, :5])


@given(t=st.integers(1, 40), hk=st.integers(1, 2), rep=st.integers(1, 3), dk=st.integers(1, 9),
       dv=st.integers(1, 9), chunk=st.integers(1, 20), gates=st.sampled_from(["decay", "zero", "strong"]))
def test_chunk_and_parallel_equal_loop_on_random_shapes(t, hk, rep, dk, dv, chunk, gates):
    args, h0 = make_inputs(2, t, hk, hk * rep, dk, dv, gates=gates)
    o_ref, s_ref = simple_gla(*args, initial_state=h0, output_final_state=True, mode="recurrent")
    for options in ({"chunk_size": chunk}, {"mode": "parallel"}):
        o, s = simple_gla(*args, initial_state=h0, output_final_state=True, **options)
        torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
