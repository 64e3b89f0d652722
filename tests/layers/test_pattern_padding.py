"""Patterns tied to absolute positions (global tokens, Longformer, BigBird, Sparse Transformer fixed, block-sparse)
are evaluated at each row's token positions, so a left-padded row of a batch attends exactly as the same row alone:
in the full forward, in decoding through every kind of cache, and in ``HybridLM.generate(attention_mask=...)``.
A distance pattern (dilated), which padding never affected, is checked alongside."""

import pytest
import torch

from hybridattn.layers.attention import MultiHeadAttention
from hybridattn.models.config import ModelConfig
from hybridattn.models.hybrid_lm import HybridLM
from hybridattn.ops import masks

BLOCKS = torch.rand(8, 8, generator=torch.Generator().manual_seed(7)) < 0.5
PATTERNS = {
    "longformer": masks.longformer(2, [0, 5]),
    "global": masks.global_tokens([0, 5]) | masks.sliding_window(1),
    "bigbird": masks.bigbird(1, 1, 1, 2, seed=2, causal=True),
    "fixed": masks.fixed(4, 1),
    "block_sparse": masks.block_sparse(BLOCKS, 3),
    "dilated": masks.dilated(4, 2),
}
PADS = [0, 4, 7]


def _batch(t, generator):
    """Rows of ``t - pad`` real tokens each, left-padded to ``t`` with random (ignored) values."""
    x = torch.randn(len(PADS), t, 32, dtype=torch.float64, generator=generator)
    return x, torch.arange(t) >= torch.tensor(PADS)[:, None]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_padded_rows_attend_as_alone_in_forward_and_decode(name):
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, n_kv_heads=2, pattern=PATTERNS[name]).double().eval()
    x, mask = _batch(24, torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = layer(x, token_mask=mask)
        cache = layer.new_cache(3)
        steps = [layer(x[:, :12], cache=cache, token_mask=mask[:, :12])]  # prefill, then steps of 1 and 2
        for start in range(12, 24, 3):
            steps += [layer(x[:, start:start + 1], cache=cache), layer(x[:, start + 1:start + 3], cache=cache)]
        steps = torch.cat(steps, dim=1)
        for row, pad in enumerate(PADS):
            alone = layer(x[row:row + 1, pad:])[0]
            torch.testing.assert_close(full[row, pad:], alone, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(steps[row, pad:], alone, rtol=1e-12, atol=1e-12)
            assert torch.equal(steps[row, :pad], torch.zeros_like(steps[row, :pad]))


def _lm(pattern_name):
    layers = [pattern_name] * 2 if pattern_name in ("longformer", "bigbird") else ["attention"] * 2
    options = {"longformer": {"window": 2, "global_tokens": [0, 5]},
               "bigbird": {"window": 1, "n_global": 1, "n_random": 1, "block": 2}}
    config = ModelConfig(vocab_size=48, d_model=32, num_layers=2, layers=layers, initializer_range=0.5,
                         attention=dict(num_heads=4, num_kv_heads=2),
                         mixer_options={k: v for k, v in options.items() if k in layers})
    torch.manual_seed(3)
    lm = HybridLM(config)
    if pattern_name not in ("longformer", "bigbird"):  # not registered mixers: put the pattern layer in place
        for block in lm.layers:
            block.self_attn = MultiHeadAttention(32, 4, n_kv_heads=2, pattern=PATTERNS[pattern_name])
        lm.reset_parameters()
    return lm.double().eval()


@pytest.mark.parametrize("name", list(PATTERNS))
def test_batched_generation_with_left_padding_equals_each_row_alone(name):
    lm = _lm(name)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 48, (3, 13), generator=g)
    mask = torch.arange(13) >= torch.tensor(PADS)[:, None]
    with torch.no_grad():
        logits = lm(ids, token_mask=mask)
        out = lm.generate(ids, max_new_tokens=8, attention_mask=mask, stop=[])
        for row, pad in enumerate(PADS):
            torch.testing.assert_close(logits[row, pad:], lm(ids[row:row + 1, pad:])[0], rtol=1e-10, atol=1e-10)
            alone = lm.generate(ids[row:row + 1, pad:], max_new_tokens=8, stop=[])
            assert out[row, pad:].tolist() == alone[0].tolist()


@pytest.mark.parametrize("causal_layer", [True, False])
def test_length_dependent_pattern_rows_attend_as_alone(causal_layer):
    # bigbird(causal=False) draws its random blocks among all ceil(T / block) blocks, so it depends on the length:
    # each padded row is evaluated at its own length (a full forward; such a pattern cannot be decoded)
    torch.manual_seed(0)
    spec = masks.bigbird(1, 1, 2, 2, seed=5)
    layer = MultiHeadAttention(32, 4, n_kv_heads=2, causal=causal_layer, pattern=spec).double().eval()
    x, mask = _batch(24, torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = layer(x, token_mask=mask)
        for row, pad in enumerate(PADS):
            alone = layer(x[row:row + 1, pad:])[0]
            torch.testing.assert_close(full[row, pad:], alone, rtol=1e-12, atol=1e-12)


def test_block_layout_sized_for_the_real_tokens_takes_padded_batches():
    # the layout covers the longest row's 16 tokens, not the 18 slots of the padded batch
    torch.manual_seed(0)
    layout = (torch.rand(4, 4, generator=torch.Generator().manual_seed(1)) < 0.5) | torch.eye(4, dtype=torch.bool)
    layer = MultiHeadAttention(16, 4, pattern=masks.block_sparse(layout, 4)).double().eval()
    x = torch.randn(2, 18, 16, dtype=torch.float64)
    mask = torch.arange(18) >= torch.tensor([2, 8])[:, None]  # rows of 16 and 10 real tokens
    with torch.no_grad():
        full = layer(x, token_mask=mask)
        for row, pad in enumerate([2, 8]):
            torch.testing.assert_close(full[row, pad:], layer(x[row:row + 1, pad:])[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["bigbird", "block_sparse", "longformer"])
def test_a_call_of_padding_only_then_real_tokens(name):
    # a first chunk that is all padding leaves zero real tokens: the pattern is still evaluated (over one position)
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, n_kv_heads=2, positions="alibi", pattern=PATTERNS[name]).double().eval()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        cache = layer.new_cache(1)
        first = layer(x[:, :2], cache=cache, token_mask=torch.zeros(1, 2, dtype=torch.bool))
        rest = layer(x[:, 2:], cache=cache)
        assert torch.equal(first, torch.zeros_like(first))
        torch.testing.assert_close(rest, layer(x[:, 2:]), rtol=1e-12, atol=1e-12)
        assert torch.equal(layer(x, token_mask=torch.zeros(1, 6, dtype=torch.bool)), torch.zeros(1, 6, 32,
                                                                                              dtype=torch.float64))
