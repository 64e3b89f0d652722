"""No NaN where the math is finite, and masked or future values are never read (NaN included), on every form and
backend, against the float64 token loop / the rows that really see the non-finite value."""

import math

import pytest
import torch

from hybridattn.ops import (delta_rule, gated_delta_rule, gla, linear_attention, masks, retention, simple_gla,
                            softmax_attention)
from hybridattn.ops.gated_delta_rule import naive_recurrent_gated_delta_rule

BACKENDS = ["naive", "sdpa", "tiled", "auto", "block_sparse"]
B, T, H, D = 2, 23, 2, 8


def _qkv(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=gen, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("backend", ["sdpa", "tiled", "auto", "block_sparse"])
@pytest.mark.parametrize("scale", [-0.4, 0.0])
def test_every_backend_agrees_with_naive_for_a_scale_of_any_sign(backend, scale):
    q, k, v = _qkv()
    want = softmax_attention(q, k, v, causal=True, scale=scale, backend="naive")
    got = softmax_attention(q, k, v, causal=True, scale=scale, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 backends vs the same-dtype reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["v", "k"])
def test_a_nan_in_the_future_or_in_padding_is_not_read(backend, where):
    q, k, v = _qkv()
    bad = {"k": k, "v": v}[where]
    bad[:, 15, 1, 3] = float("nan")
    clean = [x.clone() for x in (q, k, v)]
    clean[{"k": 1, "v": 2}[where]][:, 15] = 0.0
    # causal: rows before 15 never see token 15
    got = softmax_attention(q, k, v, causal=True, backend=backend)
    want = softmax_attention(*clean, causal=True, backend="naive")
    torch.testing.assert_close(got[:, :15], want[:, :15], rtol=1e-5, atol=1e-5)
    if where == "v":  # a row that reads the NaN value gets NaN in that column of that head, not elsewhere
        assert got[:, 15:, 1, 3].isnan().all() and not got[:, 15:, 0].isnan().any()
    else:  # a NaN key makes the whole row of that head NaN
        assert got[:, 15:, 1].isnan().all() and not got[:, 15:, 0].isnan().any()
    # padding: token 15 and later are masked out of every row
    lengths = torch.tensor([15, 15])
    got = softmax_attention(q, k, v, mask=masks.padding(lengths), backend=backend)
    want = softmax_attention(*clean, mask=masks.padding(lengths), backend="naive")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_stay_finite_where_the_nan_is_not_read():
    q, k, v = (x.requires_grad_() for x in _qkv())
    with torch.no_grad():
        v[:, 20] = float("nan")
    o = softmax_attention(q, k, v, mask=masks.padding(torch.tensor([18, 18])))
    o.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()


def _linear_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 37, 2, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    k = k / k.norm(dim=-1, keepdim=True)
    g = -torch.rand(1, 37, 2, generator=gen, dtype=torch.float64)
    beta = torch.rand(1, 37, 2, generator=gen, dtype=torch.float64)
    return q, k, v, g, beta


@pytest.mark.parametrize("mode", ["chunk", "parallel", "recurrent"])
def test_a_log_decay_of_minus_inf_resets_the_state_in_every_form(mode):
    q, k, v, g, beta = _linear_inputs()
    g[0, 20, 1] = -math.inf  # decay factor 0: head 1 forgets everything before token 20
    want, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta)
    got, _ = gated_delta_rule(q, k, v, g, beta, mode=mode, chunk_size=8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)  # float64 forms vs the float64 loop
    for fn in (simple_gla, lambda *a, **o: gla(*a[:3], a[3][..., None].expand(-1, -1, -1, 6), **o)):
        out, _ = fn(q, k, v, g, mode=mode, chunk_size=8)
        assert torch.isfinite(out).all()


def test_a_model_whose_decay_underflows_is_finite_on_a_full_forward():
    from hybridattn.models import HybridLM, ModelConfig

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("gated-deltanet-tiny", num_layers=2, d_model=32)).eval()
    with torch.no_grad():
        model.layers[0].mixer.A_log.fill_(200.0)  # exp(A_log) overflows: g = -inf for every token
        ids = torch.randint(0, 256, (1, 70))
        full = model(ids)
        cache = model.new_cache(1)
        steps = torch.cat([model(ids[:, i:i + 1], cache=cache)[0] for i in range(70)], 1)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full, steps, rtol=1e-4, atol=1e-4)  # fp32, chunked prefill vs token-by-token


LINEAR_OPS = {
    "gated_delta_rule": lambda q, k, v, g, beta, **o: gated_delta_rule(q, k, v, g, beta, **o),
    "delta_rule": lambda q, k, v, g, beta, **o: delta_rule(q, k, v, beta, **o),
    "simple_gla": lambda q, k, v, g, beta, **o: simple_gla(q, k, v, g, **o),
    "gla": lambda q, k, v, g, beta, **o: gla(q, k, v, g[..., None].expand(-1, -1, -1, q.shape[-1]), **o),
    "retention": lambda q, k, v, g, beta, **o: retention(q, k, v, **o),
    "linear_attention": lambda q, k, v, g, beta, **o: linear_attention(q, k, v, **o),
}


@pytest.mark.parametrize("name", sorted(LINEAR_OPS))
@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_a_nan_at_token_t_leaves_outputs_before_t_alone(name, mode):
    q, k, v, g, beta = _linear_inputs()
    fn = LINEAR_OPS[name]
    want, _ = fn(q, k, v, g, beta, mode="recurrent")
    v = v.clone()
    v[0, 15, 0, 2] = float("nan")
    got, _ = fn(q, k, v, g, beta, mode=mode, chunk_size=8)
    assert not got[:, :15].isnan().any(), name
    torch.testing.assert_close(got[:, :15], want[:, :15], rtol=1e-10, atol=1e-10)
    assert got[:, 15:, 0, 2].isnan().all()


@pytest.mark.parametrize("bad", [0.5, float("nan")])
def test_the_linear_family_refuses_growing_or_nan_gates(bad):
    q, k, v, g, beta = _linear_inputs()
    g[0, 3, 1] = bad
    for fn in (lambda: gated_delta_rule(q, k, v, g, beta), lambda: simple_gla(q, k, v, g),
               lambda: gla(q, k, v, g[..., None].expand(-1, -1, -1, 6).contiguous())):
        with pytest.raises(ValueError, match=r"expected log-decays <= 0"):
            fn()


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_the_linear_family_refuses_a_non_finite_scale(scale):
    q, k, v, g, beta = _linear_inputs()
    for fn in LINEAR_OPS.values():
        with pytest.raises(ValueError, match="scale: expected a finite float"):
            fn(q, k, v, g, beta, scale=scale)
