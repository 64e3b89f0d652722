"""Linear mixers vs float64 references; the short conv; the registry.

Two kinds of reference:
- each mixer in float64 with its op replaced by the op's reference (token loop) form: checks the chunk-form
  plumbing, outputs and every gradient, on odd lengths spanning several chunks;
- independent float64 re-derivations of Gated DeltaNet (transformers' Qwen3-Next equations) and Mamba2 (the SSD
  recurrence as a loop), which check the layer math itself.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from hybridattn.layers import registry
from hybridattn.layers.cache import RecurrentCache
from hybridattn.layers.mixers import deltanet, gated_deltanet, gla, linear, mamba2, retention
from hybridattn.layers.short_conv import ShortConvolution
from hybridattn.models.config import ModelConfig
from hybridattn.ops import naive_recurrent_delta_rule, naive_recurrent_gated_delta_rule


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# mixer name -> (module holding the op, op attribute name, reference op)
def _loop(op):
    return lambda *a, mode=None, chunk_size=None, **kw: op(*a, mode="recurrent", **kw)


def _naive(fn):
    return lambda *a, mode=None, chunk_size=None, **kw: fn(*a, **kw)


REFERENCE_OPS = {
    "gated_deltanet": (gated_deltanet, "gated_delta_rule", _naive(naive_recurrent_gated_delta_rule)),
    "deltanet": (deltanet, "delta_rule", _naive(naive_recurrent_delta_rule)),
    "gla": (gla, "gla", _loop(gla.gla)),
    "retention": (retention, "simple_gla", _loop(retention.simple_gla)),
    "mamba2": (mamba2, "simple_gla", _loop(mamba2.simple_gla)),
    "linear": (linear, "linear_attention", _loop(linear.linear_attention)),
}

# (mixer, linear-section overrides): GVA everywhere (Hv = 2 Hk), non-power-of-two head dims
CASES = [
    ("gated_deltanet", dict(num_heads=2, num_v_heads=4, head_dim=12, v_head_dim=10)),
    ("deltanet", dict(num_heads=2, num_v_heads=4, head_dim=12, v_head_dim=10)),
    ("gla", dict(num_heads=2, num_v_heads=4, head_dim=12, v_head_dim=10)),
    ("retention", dict(num_heads=2, num_v_heads=4, head_dim=12, v_head_dim=10)),
    ("mamba2", dict(num_heads=2, num_v_heads=4, head_dim=12, v_head_dim=10)),
    ("linear", dict(num_heads=2, num_v_heads=4, head_dim=12, v_head_dim=10, feature_map="elu+1")),
    ("linear", dict(num_heads=2, num_v_heads=2, head_dim=6, v_head_dim=10, feature_map="taylor")),
    ("linear", dict(num_heads=2, num_v_heads=4, head_dim=12, v_head_dim=10, feature_map="favor")),
]
IDS = [f"{m}-{o.get('feature_map', '')}".rstrip("-") for m, o in CASES]


def make_config(mixer, lin, **kw):
    return ModelConfig(vocab_size=32, d_model=24, num_layers=1, layers=[mixer],
                       linear=dict(chunk_size=16, **lin), **kw)


def build(mixer, lin):
    torch.manual_seed(0)
    return registry.build_mixer(mixer, make_config(mixer, lin), 0)


@pytest.mark.parametrize("mixer,lin", CASES, ids=IDS)
def test_chunk_form_matches_float64_reference_outputs_and_grads(mixer, lin, monkeypatch):
    layer = build(mixer, lin)
    x = torch.randn(2, 37, 24)  # 37: three chunks of 16, the last one partial
    ref_layer = copy.deepcopy(layer).double()
    x32 = x.clone().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    y32 = layer(x32)
    w = torch.randn_like(y32)
    (y32 * w).sum().backward()
    module, name, ref_op = REFERENCE_OPS[mixer]
    monkeypatch.setattr(module, name, ref_op)
    y64 = ref_layer(x64)
    (y64 * w.double()).sum().backward()
    assert rel_err(y32, y64) <= 1e-4
    assert rel_err(x32.grad, x64.grad) <= 1e-4
    for (pname, p32), (_, p64) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        assert rel_err(p32.grad, p64.grad) <= 1e-4, pname


@pytest.mark.parametrize("mixer,lin", CASES, ids=IDS)
def test_prefill_then_steps_equals_full_and_padding_changes_nothing(mixer, lin):
    layer = build(mixer, lin)
    x = torch.randn(2, 23, 24)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2)
        outs = [layer(x[:, :17], cache=cache)]
        outs += [layer(x[:, t:t + 1], cache=cache) for t in range(17, 23)]
        assert rel_err(torch.cat(outs, 1), full) <= 1e-4
        assert cache.seen_tokens == 23 and cache.real_tokens.tolist() == [23, 23]
        # row 1 is row 0's last 15 tokens behind 8 padding tokens: its outputs and final state are row 0's alone
        padded = torch.cat([x[:1], torch.cat([torch.zeros(1, 8, 24), x[1:, 8:]], 1)])
        mask = torch.ones(2, 23, dtype=torch.bool)
        mask[1, :8] = False
        c_pad, c_alone = layer.new_cache(2), layer.new_cache(1)
        y_pad = layer(padded, cache=c_pad, token_mask=mask)
        y_alone = layer(x[1:, 8:], cache=c_alone)
        assert rel_err(y_pad[1, 8:], y_alone[0]) <= 1e-4
        assert rel_err(c_pad.state[1], c_alone.state[0]) <= 1e-4
        assert rel_err(c_pad.conv_tail[1], c_alone.conv_tail[0]) <= 1e-6
        assert c_pad.real_tokens.tolist() == [23, 15]


def qwen3_next_gated_deltanet_reference(layer, x):
    """Transformers' Qwen3NextGatedDeltaNet equations, float64, written independently of the module."""
    p = {k: v.double() for k, v in layer.state_dict().items()}
    x = x.double()
    b, t, _ = x.shape
    hk, hv, dk, dv = layer.num_k_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim
    r = hv // hk
    qkvz = (x @ p["in_proj_qkvz.weight"].T).view(b, t, hk, -1)
    q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], -1)
    ba = (x @ p["in_proj_ba.weight"].T).view(b, t, hk, -1)
    bb, a = ba[..., :r].reshape(b, t, hv), ba[..., r:].reshape(b, t, hv)
    mixed = torch.cat([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], -1).transpose(1, 2)
    kernel = p["conv1d.weight"].shape[-1]
    mixed = F.silu(F.conv1d(F.pad(mixed, (kernel - 1, 0)), p["conv1d.weight"], groups=mixed.shape[1]))
    q, k, v = mixed.transpose(1, 2).split([hk * dk, hk * dk, hv * dv], -1)
    q = q.reshape(b, t, hk, dk).repeat_interleave(r, 2)
    k = k.reshape(b, t, hk, dk).repeat_interleave(r, 2)
    v = v.reshape(b, t, hv, dv)
    q, k = (y / (y.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() for y in (q, k))  # l2norm as fla, eps 1e-6
    beta = torch.sigmoid(bb)
    g = -p["A_log"].exp() * F.softplus(a + p["dt_bias"])
    state = torch.zeros(b, hv, dk, dv, dtype=torch.float64)
    out = []
    for i in range(t):
        state = state * g[:, i].exp()[..., None, None]
        kv_mem = torch.einsum("bhk,bhkv->bhv", k[:, i], state)
        delta = (v[:, i] - kv_mem) * beta[:, i, :, None]
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, i], delta)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * dk ** -0.5, state))
    o = torch.stack(out, 1)  # (B, T, Hv, Dv)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm.eps) * p["norm.weight"]
    o = o * F.silu(z.reshape(b, t, hv, dv))
    return o.reshape(b, t, -1) @ p["out_proj.weight"].T


def test_gated_deltanet_matches_qwen3_next_equations():
    layer = build("gated_deltanet", CASES[0][1])
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 29, 24)
    assert rel_err(layer(x), qwen3_next_gated_deltanet_reference(layer, x)) <= 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gated_deltanet_decode_steps_match_qwen3_next_equations(dtype, tol):
    """Prefill, then one-token steps: with the compiled decode step (``ops/csrc/gated_delta_decode.cpp``) and
    with the PyTorch path, against the independent float64 equations (GVA, non-power-of-two dims)."""
    from hybridattn.ops import _native

    layer = build("gated_deltanet", CASES[0][1]).to(dtype)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.A_log.uniform_(-2, 3)  # decays from mild to ~e^-20 per token
    x = torch.randn(2, 19, 24, dtype=dtype)
    reference = qwen3_next_gated_deltanet_reference(layer, x)
    for native in (True, False):
        with torch.no_grad(), contextlib.nullcontext() if native else _native.disabled():
            cache = layer.new_cache(2)
            outs = [layer(x[:, :6], cache=cache)]
            if native and _native.native_ops("gated_delta_decode") is not None:
                assert layer._can_decode_natively(x[:, :1], cache)
            outs += [layer(x[:, t:t + 1], cache=cache) for t in range(6, 19)]
        assert rel_err(torch.cat(outs, 1), reference) <= tol, native
        assert cache.seen_tokens == 19 and cache.real_tokens.tolist() == [19, 19]


def mamba2_reference(layer, x):
    """The SSD recurrence of Mamba2 as a loop, float64: h = exp(-exp(A_log) dt) h + dt B x^T; y = C h + D x."""
    p = {k: v.double() for k, v in layer.state_dict().items()}
    x = x.double()
    b, t, _ = x.shape
    h, hp, g, n = layer.num_heads, layer.head_dim, layer.n_groups, layer.state_size
    z, xbc, dt = (x @ p["in_proj.weight"].T).split([h * hp, h * hp + 2 * g * n, h], -1)
    kernel = p["conv1d.weight"].shape[-1]
    xbc = F.silu(F.conv1d(F.pad(xbc.transpose(1, 2), (kernel - 1, 0)), p["conv1d.weight"], groups=xbc.shape[-1]))
    xs, bm, cm = xbc.transpose(1, 2).split([h * hp, g * n, g * n], -1)
    xs = xs.reshape(b, t, h, hp)
    bm = bm.reshape(b, t, g, n).repeat_interleave(h // g, 2)
    cm = cm.reshape(b, t, g, n).repeat_interleave(h // g, 2)
    dt = F.softplus(dt + p["dt_bias"])
    state = torch.zeros(b, h, n, hp, dtype=torch.float64)
    ys = []
    for i in range(t):
        decay = torch.exp(-p["A_log"].exp() * dt[:, i])[..., None, None]
        state = decay * state + dt[:, i, :, None, None] * bm[:, i, :, :, None] * xs[:, i, :, None, :]
        ys.append(torch.einsum("bhn,bhnp->bhp", cm[:, i], state) + p["D"][:, None] * xs[:, i])
    y = torch.stack(ys, 1).reshape(b, t, -1) * F.silu(z)
    y = y.view(b, t, g, -1)
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + layer.norm_eps)).reshape(b, t, -1) * p["norm_weight"]
    return y @ p["out_proj.weight"].T


@pytest.mark.parametrize("groups", [1, 2])
def test_mamba2_matches_ssd_loop(groups):
    layer = build("mamba2", dict(num_heads=groups, num_v_heads=4, head_dim=6, v_head_dim=10))
    x = torch.randn(2, 27, 24)
    assert rel_err(layer(x), mamba2_reference(layer, x)) <= 1e-4


def test_short_conv_with_tail_equals_whole_sequence():
    conv = ShortConvolution(7, 4)
    x = torch.randn(3, 11, 7)
    whole, tail = conv(x)
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, groups=7)).transpose(1, 2)
    assert rel_err(whole, expected) <= 1e-6
    first, t1 = conv(x[:, :2])  # shorter than the kernel: the tail keeps zeros in front
    second, t2 = conv(x[:, 2:], tail=t1)
    assert rel_err(torch.cat([first, second], 1), expected) <= 1e-6
    assert torch.equal(t2, tail) and torch.equal(tail, x[:, -3:])


@pytest.mark.parametrize("bias", [False, True])
def test_short_conv_outputs_and_grads_match_conv1d_float64(bias):
    """The shifted multiply-add form against F.conv1d in float64: outputs and the gradients of x, weight, bias."""
    conv = ShortConvolution(5, 4, bias=bias).double()
    x = torch.randn(2, 13, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 13, 5, dtype=torch.float64)
    y, _ = conv(x)
    params = [x, conv.weight] + ([conv.bias] if bias else [])
    got = torch.autograd.grad((y * w).sum(), params)
    ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, conv.bias, groups=5)).transpose(1, 2)
    want = torch.autograd.grad((ref * w).sum(), params)
    assert (y - ref).abs().max().item() <= 1e-12
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-12


def test_short_conv_rejects_right_padding_and_wrong_tail():
    conv = ShortConvolution(4, 4)
    layer = build("deltanet", CASES[1][1])
    bad = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="token_mask: expected left padding"):
        layer(torch.randn(1, 3, 24), token_mask=bad)
    with pytest.raises(ValueError, match=r"tail: expected shape \(2, 3, 4\)"):
        conv(torch.randn(2, 5, 4), tail=torch.zeros(2, 2, 4))


def test_recurrent_cache_size_is_fixed_and_counted():
    layer = build("gated_deltanet", CASES[0][1])
    cache = layer.new_cache(3)
    assert isinstance(cache, RecurrentCache)
    before = cache.nbytes()
    assert before == 3 * 4 * 12 * 10 * 4 + 3 * 3 * (2 * 24 + 40) * 4 + 3 * 8  # state + conv tail + counters
    with torch.no_grad():
        layer(torch.randn(3, 40, 24), cache=cache)
    assert cache.nbytes() == before


def test_registry_rejects_duplicates_and_builds_user_mixers():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_mixer("gla")(lambda config, i: None)
    with pytest.raises(ValueError, match="name: expected a lower-case identifier"):
        registry.register_mixer("Bad Name")
    with pytest.raises(ValueError, match="mixer: expected one of"):
        registry.build_mixer("nope", None, 0)
    assert {"attention", "gated_deltanet", "deltanet", "gla", "retention", "mamba2", "linear"} <= set(
        registry.available_mixers())
    assert registry.is_softmax_mixer("attention") and not registry.is_softmax_mixer("gla")
