"""``conv_attention``: attention(x + depthwise causal conv(x)), checked against a float64 composition built from
plain ``F.conv1d`` and the attention layer, and for incremental decoding and left padding."""

import copy

import torch
import torch.nn.functional as F

from hybridattn.layers import registry
from hybridattn.models import ModelConfig


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def build():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=24, num_layers=1, layers=["conv_attention"],
                      attention=dict(num_heads=4, num_kv_heads=2))
    layer = registry.build_mixer("conv_attention", cfg, 0)
    with torch.no_grad():  # a non-trivial filter (the default init is fine too, but make the check sharp)
        layer.conv1d.weight.copy_(torch.randn_like(layer.conv1d.weight) * 0.5)
    return layer


def test_equals_attention_of_input_plus_causal_conv_float64_outputs_and_grads():
    layer = build()
    ref = copy.deepcopy(layer).double()
    x = torch.randn(2, 19, 24)
    x32, x64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    y32 = layer(x32)
    w = torch.randn_like(y32)
    (y32 * w).sum().backward()
    k = ref.conv1d.weight.shape[-1]
    conv = F.conv1d(F.pad(x64.transpose(1, 2), (k - 1, 0)), ref.conv1d.weight, groups=24).transpose(1, 2)
    y64 = ref.attn(x64 + conv)
    (y64 * w.double()).sum().backward()
    assert rel_err(y32, y64) <= 1e-5
    assert rel_err(x32.grad, x64.grad) <= 1e-5
    assert rel_err(layer.conv1d.weight.grad, ref.conv1d.weight.grad) <= 1e-5


def test_prefill_then_steps_equals_full_and_left_padding_changes_nothing():
    layer = build()
    x = torch.randn(2, 21, 24)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2)
        outs = [layer(x[:, :13], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(13, 21)]
        assert rel_err(torch.cat(outs, 1), full) <= 1e-5
        assert cache.seen_tokens == 21
        padded = torch.cat([x[:1], torch.cat([torch.zeros(1, 6, 24), x[1:, 6:]], 1)])
        mask = torch.ones(2, 21, dtype=torch.bool)
        mask[1, :6] = False
        y_pad = layer(padded, cache=layer.new_cache(2), token_mask=mask)
        y_alone = layer(x[1:, 6:], cache=layer.new_cache(1))
        assert rel_err(y_pad[1, 6:], y_alone[0]) <= 1e-5
