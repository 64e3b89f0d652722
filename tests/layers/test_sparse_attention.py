"""Sparse softmax mixers: registry, pattern attention against a float64 reference, decode == full forward."""

import pytest
import torch

from hybridattn.layers.registry import build_mixer
from hybridattn.layers.dsa_attention import DSAAttention
from hybridattn.layers.sparse_attention import PatternAttention
from hybridattn.layers.whole_sequence_attention import LinformerAttention, LSHAttention
from hybridattn.models import ModelConfig
from hybridattn.ops import masks
from hybridattn.ops.softmax_attention import softmax_attention

OPTIONS = {
    "sliding_window": {"window": 5},
    "longformer": {"window": 3, "global_tokens": [0, 6]},
    "bigbird": {"window": 1, "n_global": 1, "n_random": 1, "block": 4},
    "dsa": {"top_k": 6, "index_heads": 2, "index_dim": 8},
    "linformer": {"max_len": 32, "proj_len": 8},
    "lsh": {"n_buckets": 4, "n_hashes": 2},
}


def _config(name):
    return ModelConfig(d_model=48, num_layers=1, layers=[name], attention=dict(num_heads=4, num_kv_heads=2),
                       mixer_options={name: OPTIONS[name]})


@pytest.mark.parametrize("name", ["sliding_window", "longformer", "bigbird", "dsa"])
def test_decode_equals_full_forward(name):
    torch.manual_seed(0)
    mixer = build_mixer(name, _config(name), 0).double().eval()
    x = torch.randn(2, 23, 48, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.new_cache(2)
        steps = [mixer(x[:, :9], cache=cache)] + [mixer(x[:, i:i + 1], cache=cache) for i in range(9, 23)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    if name == "sliding_window":
        assert cache.k.shape[1] == 5  # a ring buffer of W slots, not T


def test_pattern_attention_matches_float64_reference():
    torch.manual_seed(1)
    pattern = masks.longformer(3, [0, 10]) | masks.fixed(6, 1)
    layer = PatternAttention(40, 4, n_kv_heads=2, pattern=pattern, positions="nope").double()
    x = torch.randn(2, 29, 40, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    q = layer.q_proj(x).view(2, 29, 4, 10)
    k, v = layer.k_proj(x).view(2, 29, 2, 10), layer.v_proj(x).view(2, 29, 2, 10)
    ref = layer.o_proj(softmax_attention(q, k, v, mask=pattern & masks.causal(), backend="naive").reshape(2, 29, 40))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_pattern_attention_padding_matches_unpadded_rows():
    torch.manual_seed(2)
    layer = PatternAttention(32, 4, pattern=masks.sliding_window(4)).double().eval()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 3, 32, dtype=torch.float64), x], dim=1)
    token_mask = torch.tensor([[False] * 3 + [True] * 12])
    with torch.no_grad():
        y = layer(x)
        y_pad = layer(padded, token_mask=token_mask)
    # left padding shifts slot positions by 3, which a window (distances only) does not see
    torch.testing.assert_close(y_pad[:, 3:], y, rtol=1e-10, atol=1e-10)
    assert torch.equal(y_pad[:, :3], torch.zeros_like(y_pad[:, :3]))


def test_dsa_with_large_top_k_is_full_causal_attention():
    torch.manual_seed(3)
    layer = DSAAttention(32, 4, n_kv_heads=2, top_k=100, index_heads=2, index_dim=8).double()
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    captured = {}
    original = layer.o_proj.forward
    layer.o_proj.forward = lambda o: captured.setdefault("o", o) is not None and original(o)
    layer(x)
    from hybridattn.ops.positions import apply_rotary

    pos = torch.arange(17)
    q = apply_rotary(layer.q_proj(x).view(2, 17, 4, 8), pos)
    k = apply_rotary(layer.k_proj(x).view(2, 17, 2, 8), pos)
    v = layer.v_proj(x).view(2, 17, 2, 8)
    ref = softmax_attention(q, k, v, causal=True, backend="naive").reshape(2, 17, 32)
    torch.testing.assert_close(captured["o"], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,cls", [("linformer", LinformerAttention), ("lsh", LSHAttention)])
def test_whole_sequence_mixers(name, cls):
    torch.manual_seed(4)
    mixer = build_mixer(name, _config(name), 0).double()
    assert isinstance(mixer, cls)
    x = torch.randn(2, 20, 48, dtype=torch.float64)
    y = mixer(x)
    if name == "lsh":
        q = mixer.qk_proj(x).view(2, 20, 4, 12)
        v = mixer.v_proj(x).view(2, 20, 4, 12)
        from hybridattn.ops.lsh_attention import lsh_attention_reference

        o = lsh_attention_reference(q, None, v, n_buckets=4, n_hashes=2, causal=True)
    else:
        q, k, v = mixer.qkv_proj(x).view(2, 20, 3, 4, 12).unbind(2)
        from hybridattn.ops.linformer import linformer_reference

        o = linformer_reference(q, k, v, mixer.E[:, :20], mixer.F[:, :20])
    torch.testing.assert_close(y, mixer.o_proj(o.reshape(2, 20, 48)), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="cache"):
        mixer.new_cache(2)


def test_options_are_validated():
    with pytest.raises(ValueError, match="mixer_options"):
        build_mixer("dsa", ModelConfig(d_model=32, num_layers=1, layers=["dsa"], mixer_options={"dsa": {"topk": 3}}), 0)
    # a window restricts the pattern further (their AND), so the cache is the window's ring buffer
    assert PatternAttention(32, 4, pattern=masks.longformer(8, [0]), window=4).new_cache(1).window == 4
