import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hybridattn.layers.attention import MultiHeadAttention
from hybridattn.layers.cache import KVCache, SlidingWindowKVCache
from hybridattn.layers.positions import T5RelativeBias, t5_relative_bucket
from hybridattn.layers.sparse_attention import PatternAttention
from hybridattn.ops import masks
from hybridattn.ops.positions import alibi_slopes

D_MODEL = 30

# name -> MultiHeadAttention options (d_model=30 throughout; head dims 10 and 6 are not powers of two)
CONFIGS = {
    "rope": dict(n_heads=3),
    "rope-gqa": dict(n_heads=6, n_kv_heads=2, head_dim=6, rope_theta=100.0),
    "qwen3next": dict(
        n_heads=4, n_kv_heads=2, head_dim=12, output_gate=True, qk_norm=True, zero_centered_norm=True,
        rotary_fraction=0.5,
    ),
    "alibi": dict(n_heads=6, positions="alibi"),
    "alibi-bidirectional": dict(n_heads=5, positions="alibi", causal=False),
    "t5": dict(n_heads=3, positions="t5", t5_num_buckets=8, t5_max_distance=12),
    "t5-bidirectional": dict(n_heads=3, positions="t5", causal=False, t5_num_buckets=8, t5_max_distance=12),
    "nope-bias": dict(n_heads=2, positions="nope", bias=True),
    "window": dict(n_heads=6, n_kv_heads=3, head_dim=10, window=4),
    "window-alibi-gated": dict(n_heads=3, window=5, positions="alibi", output_gate=True, qk_norm=True),
    "cross": dict(n_heads=6, n_kv_heads=2, cross=True, output_gate=True, qk_norm=True),
}
CAUSAL_CONFIGS = [name for name, cfg in CONFIGS.items() if not cfg.get("cross") and cfg.get("causal", True)]

_BLOCKS = torch.rand(8, 8, generator=torch.Generator().manual_seed(5)) < 0.4
_BIGBIRD = masks.bigbird(1, 1, 1, 2, seed=3, causal=True)


def _isin(p, positions):
    return torch.isin(p, torch.tensor(positions))


# name -> (pattern spec, its definition at token positions p (query) and j (key), written out independently);
# BigBird's random block layout is taken from the spec (its draw is tested in tests/ops), the rest is not
PATTERNS = {
    "dilated": (masks.dilated(4, 2), lambda p, j: (p - j >= 0) & (p - j <= 4) & ((p - j) % 2 == 0)),
    "strided": (masks.strided(3), lambda p, j: ((p - j).abs() < 3) | ((p - j) % 3 == 0)),
    "longformer": (masks.longformer(2, [0, 5]),
                   lambda p, j: ((p - j).abs() <= 2) | _isin(p, [0, 5]) | _isin(j, [0, 5])),
    "global": (masks.global_tokens([1, 4]), lambda p, j: _isin(p, [1, 4]) | _isin(j, [1, 4])),
    "fixed": (masks.fixed(4, 1), lambda p, j: (p // 4 == j // 4) | (j % 4 >= 3)),
    "block_sparse": (masks.block_sparse(_BLOCKS, 3), lambda p, j: _BLOCKS[p // 3, j // 3]),
    "bigbird": (_BIGBIRD, lambda p, j: _BIGBIRD.layout_for(16)[0, 0][p // 2, j // 2]),
}


def make_layer(name, dtype=torch.float64, **extra):
    torch.manual_seed(1)
    layer = MultiHeadAttention(D_MODEL, **{**CONFIGS[name], **extra}).to(dtype)
    with torch.no_grad():  # non-trivial norm weights and T5 table so they are tested, not the identity init
        for pname, p in layer.named_parameters():
            if "norm" in pname or "relative_bias" in pname:
                p.normal_(0.0, 0.5)
    return layer


def rope_complex(x, pos, theta, n_rot):
    """RoPE as a complex rotation: channel pairs (i, i + n/2) form x_i + 1j * x_{i+n/2}, times e^(1j p theta_i)."""
    half = n_rot // 2
    z = torch.complex(x[..., :half], x[..., half:n_rot])
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / n_rot)
    z = z * torch.polar(torch.ones_like(freq), pos.double()[..., None, None] * freq)  # pos [B, T] -> [B, T, 1, n/2]
    return torch.cat((z.real, z.imag, x[..., n_rot:]), dim=-1)


def reference(layer, x, *, token_mask=None, memory=None, memory_mask=None, pattern=None):
    """Float64 multi-head attention written out from the definitions, with the layer's weights; ``pattern(p, j)`` is
    the layer's pattern at token positions (each row's real tokens count from 0)."""
    P = {n: p.double() for n, p in layer.named_parameters()}
    x = x.double()
    b, t, _ = x.shape
    h, hkv, d = layer.n_heads, layer.n_kv_heads, layer.head_dim

    def linear(name, inp):
        out = inp @ P[name + ".weight"].T
        return out + P[name + ".bias"] if name + ".bias" in P else out

    def rms(inp, w):
        normed = inp / torch.sqrt((inp * inp).mean(-1, keepdim=True) + 1e-6)
        return normed * ((1 + w) if layer.q_norm.zero_centered else w)

    q = linear("q_proj", x).view(b, t, h, -1)
    gate = q[..., d:].reshape(b, t, h * d) if layer.output_gate else None
    q = q[..., :d]
    src = memory.double() if layer.cross else x
    tk = src.shape[1]
    k = linear("k_proj", src).view(b, tk, hkv, d)
    v = linear("v_proj", src).view(b, tk, hkv, d)
    if layer.q_norm is not None:
        q, k = rms(q, P["q_norm.weight"]), rms(k, P["k_norm.weight"])
    real = torch.ones(b, t, dtype=torch.bool) if token_mask is None else token_mask
    pos = (real.long().cumsum(1) - 1).clamp(min=0)
    if layer.positions == "rope":
        n_rot = int(d * layer.rotary_fraction)
        q, k = rope_complex(q, pos, layer.rope_theta, n_rot), rope_complex(k, pos, layer.rope_theta, n_rot)
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * d**-0.5
    i = torch.arange(t).view(t, 1) + tk - t
    j = torch.arange(tk).view(1, tk)
    if layer.positions == "alibi":
        dist = (i - j).clamp(min=0) if layer.causal else (i - j).abs()
        s = s - alibi_slopes(h, dtype=torch.float64).view(1, h, 1, 1) * dist
    if layer.positions == "t5":
        rb = layer.relative_bias
        buckets = t5_relative_bucket(j - i, bidirectional=rb.bidirectional, num_buckets=rb.num_buckets,
                                     max_distance=rb.max_distance)
        s = s + P["relative_bias.weight"][buckets].permute(2, 0, 1)
    keep = torch.ones(b, 1, t, tk, dtype=torch.bool)
    if layer.causal:
        keep = keep & (j <= i)
    if layer.window is not None:
        keep = keep & (i - j < layer.window)
    if pattern is not None:
        keep = keep & pattern(pos[:, None, :, None], pos[:, None, None, :])
    key_valid = memory_mask if layer.cross else token_mask
    if key_valid is not None:
        keep = keep & key_valid[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    o = torch.einsum("bhij,bjhd->bihd", p, v).reshape(b, t, h * d)
    if gate is not None:
        o = o * torch.sigmoid(gate)
    y = linear("o_proj", o)
    return y * real[..., None]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _inputs(name, b=2, t=13, tm=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, t, D_MODEL, generator=g, dtype=dtype)
    memory = torch.randn(b, tm, D_MODEL, generator=g, dtype=dtype) if CONFIGS[name].get("cross") else None
    return x, memory


def _has_tiled():
    try:
        import hybridattn.ops.tiled_attention  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("backend", ["auto", "naive", "tiled"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_float64_reference_outputs_and_grads(name, backend):
    if backend == "tiled" and not _has_tiled():
        pytest.skip("tiled backend not available yet")
    layer = make_layer(name, backend=backend)
    x, memory = _inputs(name)
    x.requires_grad_(True)
    y = layer(x, memory=memory)
    ref = reference(layer, x, memory=memory)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    params = [p for _, p in layer.named_parameters()]
    got = torch.autograd.grad(y, [x, *params], dy)
    expected = torch.autograd.grad(ref, [x, *params], dy)
    for (pname, _), g1, g0 in zip([("x", x), *layer.named_parameters()], got, expected):
        assert g0.abs().max() > 0, pname  # every part of the layer is exercised
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-10, msg=lambda m: f"{pname}: {m}")


@pytest.mark.parametrize("name", ["rope", "qwen3next", "alibi", "t5", "nope-bias"])
def test_left_padding_matches_reference_and_rows_alone(name):
    layer = make_layer(name)
    x, _ = _inputs(name, t=11)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :4] = False
    y = layer(x, token_mask=mask)
    torch.testing.assert_close(y, reference(layer, x, token_mask=mask), rtol=1e-10, atol=1e-10)
    assert torch.equal(y[0, :4], torch.zeros(4, D_MODEL, dtype=y.dtype))
    torch.testing.assert_close(y[0, 4:], layer(x[0:1, 4:])[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[1], layer(x[1:2])[0], rtol=1e-10, atol=1e-10)


def _decode(layer, x, prefill, *, token_mask=None, cache=None):
    """Prefill ``prefill`` tokens, then one token per call; returns the concatenated outputs and the cache."""
    cache = layer.new_cache(x.shape[0]) if cache is None else cache
    outs = []
    for s in [0, *range(prefill, x.shape[1])]:
        e = prefill if s == 0 else s + 1
        m = None if token_mask is None else token_mask[:, s:e]
        outs.append(layer(x[:, s:e], cache=cache, token_mask=m))
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_matches_float64_reference_and_padded_rows_attend_as_alone(name):
    spec, pattern = PATTERNS[name]
    layer = make_layer("rope-gqa", pattern=spec)
    x, _ = _inputs("rope-gqa", b=3, t=23)
    pads = [4, 0, 9]
    mask = torch.arange(23) >= torch.tensor(pads)[:, None]  # left padding
    x.requires_grad_(True)
    y = layer(x, token_mask=mask)
    ref = reference(layer, x, token_mask=mask, pattern=pattern)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    inputs = [x, *layer.parameters()]
    for g1, g0 in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(ref, inputs, dy)):
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-10)
    # the pattern is evaluated at each row's token positions, not at its slots: a padded row attends as alone
    with torch.no_grad():
        for row, pad in enumerate(pads):
            torch.testing.assert_close(y[row, pad:].detach(), layer(x[row:row + 1, pad:])[0], rtol=1e-10, atol=1e-10)


def test_window_is_a_sliding_window_pattern_and_combines_with_a_pattern():
    x, _ = _inputs("window", t=17)
    window = make_layer("window")
    as_pattern = make_layer("window", window=None, pattern=masks.sliding_window(3))
    torch.testing.assert_close(as_pattern(x), window(x), rtol=1e-12, atol=1e-12)  # float64, maybe other backends
    assert as_pattern.new_cache(2).window == window.new_cache(2).window == 4
    spec, longformer = PATTERNS["longformer"]
    both = make_layer("window", pattern=spec)  # window=4 AND longformer: the window bounds the global tokens too
    mask = torch.arange(17) >= torch.tensor([[3], [0]])
    torch.testing.assert_close(both(x, token_mask=mask), reference(both, x, token_mask=mask, pattern=longformer),
                               rtol=1e-10, atol=1e-10)
    cache = both.new_cache(2)
    assert type(cache) is SlidingWindowKVCache and cache.window == 4  # the smaller of the two reaches


def test_pattern_attention_is_multi_head_attention_with_a_required_pattern():
    spec, _ = PATTERNS["fixed"]
    old = PatternAttention(D_MODEL, 3, pattern=spec, positions="alibi").double()
    new = MultiHeadAttention(D_MODEL, 3, pattern=spec, positions="alibi").double()
    new.load_state_dict(old.state_dict())
    x, _ = _inputs("rope", t=12)
    assert isinstance(old, MultiHeadAttention) and old.pattern is spec
    torch.testing.assert_close(old(x), new(x), rtol=1e-12, atol=1e-12)  # two float64 instances
    with pytest.raises(TypeError, match="pattern: expected a MaskSpec"):
        PatternAttention(D_MODEL, 3, pattern=None)


@pytest.mark.parametrize("name", CAUSAL_CONFIGS)
def test_prefill_then_decode_equals_full_forward(name):
    layer = make_layer(name, dtype=torch.float32)
    x, _ = _inputs(name, t=15, dtype=torch.float32)
    with torch.no_grad():
        full = layer(x)
        steps, cache = _decode(layer, x, prefill=6)
    assert rel_err(steps, full) <= 1e-5
    assert cache.seen_tokens == 15
    if layer.window is not None:
        assert isinstance(cache, SlidingWindowKVCache) and cache.k.shape[1] == layer.window
    else:
        assert isinstance(cache, KVCache) and cache.length == 15


@pytest.mark.parametrize("name", ["rope", "qwen3next", "alibi", "window", "t5"])
def test_left_padded_batch_through_cache_equals_each_row_alone(name):
    layer = make_layer(name, dtype=torch.float32)
    x, _ = _inputs(name, t=14, dtype=torch.float32)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, :5] = False  # row 1 has 9 real tokens, left padded by 5
    with torch.no_grad():
        steps, cache = _decode(layer, x, prefill=7, token_mask=mask)
        alone0 = layer(x[0:1])
        alone1 = layer(x[1:2, 5:])
    assert rel_err(steps[0:1], alone0) <= 1e-5
    assert rel_err(steps[1:2, 5:], alone1) <= 1e-5
    assert torch.equal(steps[1, :5], torch.zeros(5, D_MODEL))
    assert cache.real_tokens.tolist() == [14, 9]


def test_sliding_window_cache_is_exact_and_bounded():
    layer = make_layer("window", dtype=torch.float32)
    x, _ = _inputs("window", t=40, dtype=torch.float32)
    with torch.no_grad():
        full = layer(x)
        steps, cache = _decode(layer, x, prefill=9)
    assert rel_err(steps, full) <= 1e-5
    # the window matters (a full-attention layer with the same weights differs) and storage is W slots, not T
    unwindowed = make_layer("window", dtype=torch.float32, window=None)
    unwindowed.load_state_dict(layer.state_dict())
    assert rel_err(unwindowed(x).detach(), full) > 1e-2
    grow = unwindowed.new_cache(2)
    with torch.no_grad():
        _decode(unwindowed, x, prefill=9, cache=grow)
    assert cache.nbytes() < grow.nbytes() / 4


def test_cross_attention_with_memory_mask_and_cached_memory():
    layer = make_layer("cross")
    x, memory = _inputs("cross", t=6, tm=9)
    memory_mask = torch.ones(2, 9, dtype=torch.bool)
    memory_mask[0, 6:] = False
    memory_mask[1, :2] = False
    y = layer(x, memory=memory, memory_mask=memory_mask)
    torch.testing.assert_close(y, reference(layer, x, memory=memory, memory_mask=memory_mask), rtol=1e-10, atol=1e-10)
    # memory keys/values computed once, then reused by later calls (decoder steps) without passing memory
    cache = layer.new_cache(2)
    with torch.no_grad():
        first = layer(x[:, :2], cache=cache, memory=memory, memory_mask=memory_mask)
        later = [layer(x[:, i : i + 1], cache=cache) for i in range(2, 6)]
    torch.testing.assert_close(torch.cat([first, *later], dim=1), y.detach(), rtol=1e-10, atol=1e-10)
    assert cache.seen_tokens == 9


def test_shared_t5_bias_gets_gradients_from_every_layer():
    shared = T5RelativeBias(3, num_buckets=8, max_distance=12, bidirectional=False).double()
    layers = [MultiHeadAttention(D_MODEL, 3, positions="t5", relative_bias=shared).double() for _ in range(2)]
    assert layers[0].relative_bias is layers[1].relative_bias
    x, _ = _inputs("t5")
    h0 = layers[0](x)
    y = layers[1](h0)
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, [shared.weight], dy, retain_graph=True)
    # the table's gradient is the sum of what each layer sends it: layer 1 directly, layer 0 through h0
    (g1,) = torch.autograd.grad(layers[1](h0.detach()), [shared.weight], dy)
    (dh0,) = torch.autograd.grad(y, [h0], dy)
    (g0,) = torch.autograd.grad(h0, [shared.weight], dh0)
    assert g0.abs().max() > 0 and g1.abs().max() > 0
    torch.testing.assert_close(g, g0 + g1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(d_model=30, n_heads=4), ValueError, "d_model: expected a multiple of n_heads=4"),
        (dict(d_model=30, n_heads=6, n_kv_heads=4), ValueError, "n_heads"),
        (dict(d_model=30, n_heads=3, positions="sinusoidal"), ValueError, "positions"),
        (dict(d_model=30, n_heads=3, cross=True, positions="rope"), ValueError, "positions"),
        (dict(d_model=30, n_heads=3, cross=True, causal=True), ValueError, "causal"),
        (dict(d_model=30, n_heads=3, causal=False, window=4), ValueError, "window"),
        (dict(d_model=30, n_heads=3, cross=True, pattern=masks.sliding_window(2)), ValueError, "pattern: a pattern"),
        (dict(d_model=30, n_heads=3, pattern="window"), TypeError, "pattern: expected a MaskSpec"),
        (dict(d_model=30, n_heads=3, rotary_fraction=0.3), ValueError, "rotary_fraction"),
        (dict(d_model=30, n_heads=3, n_kv_heads=0), ValueError, "n_kv_heads"),
        (dict(d_model=30, n_heads=3, relative_bias=T5RelativeBias(3)), ValueError, "relative_bias: only used"),
        (dict(d_model=30, n_heads=3, positions="t5", relative_bias=T5RelativeBias(2)), ValueError, "relative_bias"),
    ],
)
def test_constructor_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiHeadAttention(**kwargs)


def test_forward_validation():
    layer = MultiHeadAttention(D_MODEL, 3)
    with pytest.raises(ValueError, match="x: expected \\[B, T, d_model=30\\]"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="x: expected 3 dimensions"):
        layer(torch.randn(5, 30))
    with pytest.raises(ValueError, match="memory"):
        layer(torch.randn(2, 5, 30), memory=torch.randn(2, 3, 30))
    with pytest.raises(TypeError, match="cache"):
        layer(torch.randn(2, 5, 30), cache=object())
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 5, 30), token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache: expected a KVCache for this layer, received a SlidingWindowKVCache"):
        layer(torch.randn(2, 5, 30), cache=SlidingWindowKVCache(2, 3, 10, 4))
    with pytest.raises(TypeError, match="k: expected dtype torch.float64"):
        layer(torch.randn(2, 5, 30), cache=KVCache(2, 3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="token_mask: expected left padding"):
        layer(torch.randn(1, 3, 30), token_mask=torch.tensor([[True, False, True]]))
    encoder = MultiHeadAttention(D_MODEL, 3, causal=False)
    with pytest.raises(ValueError, match="cache: incremental decoding needs causal"):
        encoder(torch.randn(2, 5, 30), cache=encoder.new_cache(2))
    cross = MultiHeadAttention(D_MODEL, 3, cross=True)
    with pytest.raises(ValueError, match="memory"):
        cross(torch.randn(2, 5, 30))
    with pytest.raises(ValueError, match="memory: expected batch size 2"):
        cross(torch.randn(2, 5, 30), memory=torch.randn(3, 4, 30))


@pytest.mark.slow  # importing transformers (and fla) costs ~40 s of CPU; models/test_qwen3_next covers CI
@pytest.mark.needs_transformers
def test_matches_transformers_qwen3_next_attention():
    pytest.importorskip("transformers", reason="transformers is the peer this test compares against")
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention, Qwen3NextRotaryEmbedding

    cfg = Qwen3NextConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.25})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    peer = Qwen3NextAttention(cfg, layer_idx=3).eval()
    with torch.no_grad():
        for p in peer.parameters():
            torch.nn.init.normal_(p, std=0.2)
    layer = MultiHeadAttention(48, 4, n_kv_heads=2, head_dim=16, output_gate=True, qk_norm=True,
                               zero_centered_norm=True, rotary_fraction=0.25, rope_theta=1000.0)
    layer.load_state_dict(peer.state_dict())  # same parameter names and layouts: checkpoints load as they are
    x = torch.randn(2, 11, 48)
    pos = torch.arange(11).expand(2, 11)
    cos_sin = Qwen3NextRotaryEmbedding(cfg)(x, pos)
    causal = torch.full((11, 11), float("-inf")).triu(1).expand(2, 1, 11, 11)
    expected, _ = peer(x, position_embeddings=cos_sin, attention_mask=causal)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@st.composite
def _layer_case(draw):
    n_kv = draw(st.integers(1, 2))
    n_heads = n_kv * draw(st.sampled_from([1, 2, 4]))
    positions = draw(st.sampled_from(["rope", "alibi", "t5", "nope"]))
    options = dict(
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=2 * draw(st.integers(1, 6)), positions=positions,
        output_gate=draw(st.booleans()), qk_norm=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(1, 6))),
        rotary_fraction=draw(st.sampled_from([1.0, 0.5])) if positions == "rope" else 1.0,
    )
    if options["rotary_fraction"] == 0.5 and options["head_dim"] % 4:
        options["head_dim"] *= 2
    pattern = draw(st.one_of(st.none(), st.sampled_from(sorted(PATTERNS))))
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 19))
    pads = [draw(st.integers(0, length - 1)) for _ in range(batch)]
    chunks = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    return options, pattern, batch, length, pads, chunks


@given(_layer_case())
def test_random_layers_and_chunkings_match_reference(case):
    options, pattern, batch, length, pads, chunks = case
    spec, definition = PATTERNS[pattern] if pattern else (None, None)
    torch.manual_seed(3)
    layer = MultiHeadAttention(D_MODEL, pattern=spec, **options).double()
    x = torch.randn(batch, length, D_MODEL, dtype=torch.float64)
    mask = torch.arange(length).expand(batch, length) >= torch.tensor(pads)[:, None]  # left padding
    expected = reference(layer, x, token_mask=mask, pattern=definition)
    torch.testing.assert_close(layer(x, token_mask=mask), expected, rtol=1e-10, atol=1e-10)
    cache, outs, start, i = layer.new_cache(batch), [], 0, 0
    with torch.no_grad():
        while start < length:  # calls of varying sizes: chunked prefill, then decode steps
            end = min(length, start + chunks[i % len(chunks)])
            outs.append(layer(x[:, start:end], cache=cache, token_mask=mask[:, start:end]))
            start, i = end, i + 1
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, rtol=1e-10, atol=1e-10)
