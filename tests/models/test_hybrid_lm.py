"""HybridLM: prefill + recurrent steps equal one full forward; left padding equals each sequence alone; cache
sizes; selected logits; validation."""

import pytest
import torch

from hybridattn.models.config import ModelConfig
from hybridattn.models.hybrid_lm import HybridLM

LIN = dict(num_heads=2, num_v_heads=4, head_dim=12, v_head_dim=10, chunk_size=16)
ATT = dict(num_heads=4, num_kv_heads=2, head_dim=12, output_gate=True, qk_norm=True, partial_rotary_factor=0.5)

# every mixer alone, hybrid ratios and patterns, a sliding-window softmax layer
LAYOUTS = {
    "gated_deltanet": dict(num_layers=2, hybrid="1:0"),
    "deltanet": dict(num_layers=2, hybrid="1:0", linear_mixer="deltanet"),
    "gla": dict(num_layers=2, hybrid="1:0", linear_mixer="gla"),
    "retention": dict(num_layers=2, hybrid="1:0", linear_mixer="retention"),
    "mamba2": dict(num_layers=2, hybrid="1:0", linear_mixer="mamba2"),
    "linear": dict(num_layers=2, hybrid="1:0", linear_mixer="linear"),
    "attention": dict(num_layers=2, hybrid="0:1"),
    "hybrid-3:1": dict(num_layers=4, hybrid="3:1", norm="rms_zero_centred"),
    "pattern-mixed": dict(num_layers=4, pattern="gla, mamba2, A, deltanet"),
    "sliding-window": dict(num_layers=2, pattern="LA", attention=dict(ATT, window=8)),
}


def make_model(layout, **kw):
    torch.manual_seed(0)
    args = dict(vocab_size=50, d_model=24, linear=LIN, attention=ATT, ffn=dict(intermediate_size=40))
    args.update(LAYOUTS[layout])
    args.update(kw)
    return HybridLM(ModelConfig(**args)).eval()


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_prefill_plus_steps_equals_full_forward(layout):
    model = make_model(layout)
    ids = torch.randint(0, 50, (2, 29))
    full = model(ids)
    cache = model.new_cache(2)
    logits, cache = model(ids[:, :21], cache=cache)  # two chunks of 16, the second partial
    steps = [logits] + [model(ids[:, t:t + 1], cache=cache)[0] for t in range(21, 29)]
    assert rel_err(torch.cat(steps, 1), full) <= 1e-4
    assert cache.seen_tokens == 29


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone(layout):
    model = make_model(layout)
    lengths = [13, 6, 9]
    seqs = [torch.randint(1, 50, (1, n)) for n in lengths]
    t = max(lengths)
    batch = torch.zeros(3, t, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.bool)
    for i, s in enumerate(seqs):
        batch[i, t - s.shape[1]:] = s[0]
        mask[i, t - s.shape[1]:] = True
    cache = model.new_cache(3)
    logits, cache = model(batch, cache=cache, token_mask=mask)
    nxt = torch.randint(0, 50, (3, 1))
    step, _ = model(nxt, cache=cache)
    for i, s in enumerate(seqs):
        alone = model(torch.cat([s, nxt[i:i + 1]], 1))
        n = s.shape[1]
        assert rel_err(logits[i, t - n:], alone[0, :n]) <= 1e-4
        assert rel_err(step[i, 0], alone[0, n]) <= 1e-4


@torch.no_grad()
def test_pure_linear_cache_does_not_grow_but_softmax_cache_does():
    for layout, grows in (("gated_deltanet", False), ("mamba2", False), ("attention", True)):
        model = make_model(layout)
        cache = model.new_cache(1)
        model(torch.randint(0, 50, (1, 56)), cache=cache)
        sizes = []
        for _ in range(3):  # 64, 68, 72 tokens: a KV cache outgrows its first 64 slots
            for _ in range(4):
                model(torch.randint(0, 50, (1, 1)), cache=cache)
            sizes.append(cache.nbytes())
        assert (sizes[0] < sizes[-1]) == grows, layout
        if not grows:
            assert sizes == [model.new_cache(1).nbytes()] * 3


@torch.no_grad()
def test_logits_at_selected_positions():
    model = make_model("hybrid-3:1")
    ids = torch.randint(0, 50, (2, 11))
    full = model(ids)
    # the selected rows go through GEMMs of other shapes than the full forward: BLAS may round them differently
    torch.testing.assert_close(model(ids, logits_at=torch.tensor([0, 4, -1])), full[:, [0, 4, 10]])
    per_row = torch.tensor([[1, 2], [9, 3]])
    expected = torch.stack([full[0, [1, 2]], full[1, [9, 3]]])
    torch.testing.assert_close(model(ids, logits_at=per_row), expected)
    with pytest.raises(ValueError, match="logits_at: expected positions in"):
        model(ids, logits_at=torch.tensor([11]))


def test_tied_and_untied_embeddings():
    tied = make_model("gated_deltanet", tie_embeddings=True)
    untied = make_model("gated_deltanet", tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 50 * 24


def test_gradients_flow_to_every_parameter():
    model = make_model("pattern-mixed").train()
    loss = model(torch.randint(0, 50, (2, 19))).logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize("bad,err,match", [
    (torch.randint(0, 50, (3,)), ValueError, r"input_ids: expected shape \[B, T\]"),
    (torch.full((1, 3), 50), ValueError, r"input_ids: expected ids in \[0, 50\)"),
    (torch.ones(1, 3), TypeError, "input_ids: expected dtype torch.int64 or torch.int32"),
])
def test_bad_input_ids(bad, err, match):
    with pytest.raises(err, match=match):
        make_model("gated_deltanet")(bad)


def test_bad_mask_and_cache():
    model = make_model("hybrid-3:1")
    ids = torch.randint(0, 50, (2, 4))
    with pytest.raises(ValueError, match=r"token_mask: expected shape \(2, 4\)"):
        model(ids, token_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask: expected left padding"):
        model(ids, token_mask=torch.tensor([[True, False, True, True]] * 2))
    with pytest.raises(TypeError, match="cache: expected the ModelCache"):
        model(ids, cache=make_model("gated_deltanet").new_cache(2))


@torch.no_grad()
def test_bfloat16_model_follows_float32():
    model = make_model("pattern-mixed")
    low = make_model("pattern-mixed").to(torch.bfloat16)
    low.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (2, 21))
    full = low(ids)
    assert full.dtype == torch.bfloat16
    assert rel_err(full, model(ids)) <= 3e-2  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    cache = low.new_cache(2)
    logits, cache = low(ids[:, :20], cache=cache)
    step, _ = low(ids[:, 20:], cache=cache)
    assert rel_err(torch.cat([logits, step], 1), full) <= 3e-2
    assert all(c.state.dtype == torch.float32 for c in cache.layers if hasattr(c, "state"))


def test_moe_feed_forward_layers_follow_the_sparse_step():
    model = make_model("hybrid-3:1", moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=16, decoder_sparse_step=2))
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["SwiGLU", "MoEFeedForward", "SwiGLU", "MoEFeedForward"]
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        padded = model(ids, token_mask=mask)
        alone = model(ids[1:, 3:])
    assert rel_err(padded[1, 3:], alone[0]) <= 1e-4


def test_skeleton_is_shape_only_and_receives_weights():
    model = make_model("pattern-mixed")
    skeleton = HybridLM.skeleton(model.config)
    assert skeleton.num_parameters() == model.num_parameters()
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    skeleton.load_state_dict(model.state_dict(), assign=True)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(skeleton(ids), model(ids))
