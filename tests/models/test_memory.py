"""The memory planner vs the actual cache tensors of tiny models after decoding."""

import pytest
import torch

from hybridattn.cli import main
from hybridattn.models.config import ModelConfig
from hybridattn.models.hybrid_lm import HybridLM
from hybridattn.models.memory import format_bytes, plan


def decode(model, batch, prompt, steps):
    cache = model.new_cache(batch)
    with torch.no_grad():
        logits, _ = model(torch.randint(0, model.config.vocab_size, (batch, prompt)), cache=cache)
        for _ in range(steps):
            logits, _ = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [
    dict(num_layers=4, hybrid="3:1"),
    dict(num_layers=4, pattern="gla, mamba2, A, deltanet"),
    dict(num_layers=2, pattern="LA", attention=dict(num_heads=4, num_kv_heads=2, window=16)),  # ring buffer
])
def test_plan_equals_actual_cache_bytes(layout, dtype):
    cfg = ModelConfig(vocab_size=64, d_model=32, linear=dict(num_heads=2, num_v_heads=4, head_dim=8, v_head_dim=8),
                      **{"attention": dict(num_heads=4, num_kv_heads=2), **layout})
    model = HybridLM(cfg).to(dtype)
    cache = decode(model, batch=2, prompt=67, steps=4)  # 71 tokens: the growing KV cache has 128 slots
    kv = [c for c in cache.layers if hasattr(c, "k")]
    slots = kv[0].k.shape[1]
    p = plan(cfg, slots, batch=2, dtype=dtype)
    actual = cache.nbytes_by_type()
    assert {k.mixer: k.cache_bytes for k in p.kinds} == actual
    assert p.cache_bytes == cache.nbytes()
    assert p.params == model.num_parameters()
    assert p.param_bytes == sum(t.numel() * t.element_size() for t in model.parameters())
    # softmax-only comparison: the same model with attention everywhere, actual caches again
    soft = HybridLM(cfg.replace(layers=["attention"] * cfg.num_layers)).to(dtype)
    soft_cache = soft.new_cache(2)
    for c in soft_cache.layers:
        c.update(*(torch.zeros(2, slots, c.num_heads, c.head_dim, dtype=dtype),) * 2)
    assert p.softmax_only.cache_bytes == soft_cache.nbytes()


def test_recurrent_parts_are_independent_of_context():
    cfg = ModelConfig.preset("qwen3-next-tiny")
    short, long = plan(cfg, 1_000), plan(cfg, 100_000)
    lin = lambda p: next(k for k in p.kinds if k.mixer == "gated_deltanet")
    att = lambda p: next(k for k in p.kinds if k.mixer == "attention")
    assert lin(short).cache_bytes == lin(long).cache_bytes > 0
    assert att(long).kv_bytes == 100 * att(short).kv_bytes
    # attention matrix: B x H x T x T in the plan's dtype
    assert short.attention_matrix[4096] == cfg.attention.num_heads * 4096 ** 2 * 2


def test_qwen3_next_80b_plan():
    cfg = ModelConfig.preset("qwen3-next-80b")
    p = plan(cfg, 262_144)
    att = next(k for k in p.kinds if k.mixer == "attention")
    lin = next(k for k in p.kinds if k.mixer == "gated_deltanet")
    # 12 softmax layers x K and V x 262144 slots x 2 KV heads x 256 dims x 2 bytes
    assert att.kv_bytes == 12 * 2 * 262_144 * 2 * 256 * 2
    # 36 linear layers x 32 value heads x 128 x 128 float32 states; conv tail 3 x (2*16*128 + 32*128) bf16
    assert lin.state_bytes == 36 * 32 * 128 * 128 * 4
    assert lin.conv_bytes == 36 * 3 * (2 * 16 * 128 + 32 * 128) * 2
    assert 79e9 < p.params < 81e9  # "80B" total parameters (MTP head excluded)
    assert p.cache_bytes / p.softmax_only.cache_bytes < 0.3


def test_cli_prints_the_plan(capsys):
    assert main(["memory", "--preset", "qwen3-next-tiny", "--context", "4096", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    p = plan(ModelConfig.preset("qwen3-next-tiny"), 4096, dtype=torch.float32)
    assert format_bytes(p.cache_bytes) in out and format_bytes(p.softmax_only.cache_bytes) in out
    assert "32,768" in out and f"{p.params:,}" in out
