"""HybridLM with the sparse mixers: no registered causal mixer lets a position see later tokens, non-causal ones are
refused, a sliding_window / longformer / bigbird / dsa model trains, generates and round-trips a checkpoint,
mixer options are checked by the config, and the memory planner sizes DSA and conv_attention caches exactly."""

import pytest
import torch

from hybridattn.layers.registry import available_mixers, is_causal_mixer, is_softmax_mixer
from hybridattn.models.config import ModelConfig
from hybridattn.models.hybrid_lm import HybridLM
from hybridattn.models.memory import plan

# small options so that every sparse pattern is actually sparse at the test lengths
OPTIONS = {
    "sliding_window": {"window": 5},
    "longformer": {"window": 3, "global_tokens": [0, 6]},
    "bigbird": {"window": 1, "n_global": 1, "n_random": 1, "block": 4},
    "dsa": {"top_k": 6, "index_heads": 2, "index_dim": 8},
    "conv_attention": {"conv_size": 3},
    "linformer": {"max_len": 64, "proj_len": 8},
    "lsh": {"n_buckets": 4, "n_hashes": 2},
}
REGISTERED = available_mixers()
CAUSAL = [name for name in REGISTERED if is_causal_mixer(name)]
NON_CAUSAL = [name for name in REGISTERED if not is_causal_mixer(name)]
SPARSE = ["sliding_window", "longformer", "bigbird", "dsa"]


def config(layers, **kw):
    args = dict(vocab_size=40, d_model=32, num_layers=len(layers), layers=layers,
                attention=dict(num_heads=4, num_kv_heads=2), linear=dict(num_heads=2, chunk_size=8),
                ffn=dict(intermediate_size=48), mixer_options={n: OPTIONS[n] for n in set(layers) if n in OPTIONS})
    args.update(kw)
    return ModelConfig(**args)


def model(layers, **kw):
    torch.manual_seed(0)
    return HybridLM(config(layers, **kw)).double().eval()


def test_the_sets_cover_the_registry():
    assert NON_CAUSAL == ["linformer", "lsh"] and set(SPARSE) <= set(CAUSAL)


@pytest.mark.parametrize("name", CAUSAL)
@torch.no_grad()
def test_no_registered_causal_mixer_lets_a_position_see_later_tokens(name):
    lm = model([name, name])
    ids = torch.randint(0, 40, (2, 23))
    base = lm(ids)
    for t in (0, 11, 22):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 40
        out = lm(changed)
        # another input changes no GEMM shape, but buffers move: rounding-level tolerance, far below a leak
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: logits before {t} moved: {m}")
        assert not torch.equal(out[:, t], base[:, t])  # the change itself is seen (the check is not vacuous)


@pytest.mark.parametrize("name", NON_CAUSAL)
def test_non_causal_mixers_are_refused_by_the_lm_and_the_planner(name):
    cfg = config(["gated_deltanet", name])  # the config stays valid: the mixer can be built alone from it
    for build in (HybridLM, HybridLM.skeleton, lambda c: plan(c, 128)):
        with pytest.raises(ValueError, match=rf"layers\[1\]: expected a causal mixer.*{name}"):
            build(cfg)


def test_sparse_pattern_lm_trains_generates_and_round_trips(tmp_path):
    lm = model(SPARSE).train()
    # every softmax-family mixer stays in self_attn (checkpoint keys of existing models do not move)
    assert all(is_softmax_mixer(n) for n in SPARSE)
    assert {k.split(".")[2] for k in lm.state_dict() if k.startswith("layers.")} >= {"self_attn"}
    assert not any("linear_attn" in k for k in lm.state_dict())
    ids = torch.randint(0, 40, (2, 29))
    logits = lm(ids)
    assert logits.shape == (2, 29, 40) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1)) + lm.aux_loss
    loss.backward()
    missing = [n for n, p in lm.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []  # the DSA indexer included, through aux_loss
    lm.eval()
    prompt = ids[:, :9]
    out = lm.generate(prompt, max_new_tokens=20)  # decoding through every cache kind, past the windows
    with torch.no_grad():
        seq = prompt
        for _ in range(20):
            seq = torch.cat([seq, lm(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    lm.save_pretrained(tmp_path)
    loaded = HybridLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.config == lm.config
    state, back = lm.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), lm(ids), rtol=1e-12, atol=1e-12)  # two float64 instances


def test_aux_loss_weights_the_indexer_kl_by_its_coefficient():
    lm = model(["dsa", "gated_deltanet", "dsa"], indexer_aux_loss_coef=0.25)
    lm(torch.randint(0, 40, (2, 13)))
    kls = [layer.mixer.aux_loss for layer in lm.layers if layer.layer_type == "dsa"]
    torch.testing.assert_close(lm.aux_loss, 0.25 * (kls[0] + kls[1]), rtol=1e-14, atol=0)
    with torch.no_grad():
        lm(torch.randint(0, 40, (2, 13)))
    assert lm.aux_loss is None and model(["gated_deltanet"]).aux_loss is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(mixer_options={"dsa": {"topk": 3}}), r"mixer_options\['dsa'\]: expected keys among"),
    (dict(mixer_options={"attention": {"window": 3}}), r"mixer_options\['attention'\]: expected keys among \[\]"),
    (dict(indexer_aux_loss_coef=-1.0), "indexer_aux_loss_coef"),
    (dict(moe=dict(router_aux_loss_coef=-0.1)), r"moe\.router_aux_loss_coef"),
])
def test_config_checks_mixer_options_and_coefficients(kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(["dsa"], **kwargs)


def test_mixer_option_values_are_named():
    with pytest.raises(ValueError, match=r"mixer_options\['longformer'\]\.window: expected an int >= 0, received -1"):
        HybridLM(config(["longformer"], mixer_options={"longformer": {"window": -1}}))
    with pytest.raises(ValueError, match=r"mixer_options\['dsa'\]\.top_k"):
        HybridLM(config(["dsa"], mixer_options={"dsa": {"top_k": 0}}))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_equals_actual_cache_bytes_for_dsa_and_conv_attention(dtype):
    cfg = config(["dsa", "conv_attention", "gated_deltanet", "sliding_window", "bigbird"])
    lm = HybridLM(cfg).to(dtype).eval()
    cache = lm.new_cache(2)
    logits, _ = lm(torch.randint(0, 40, (2, 67)), cache=cache)
    for _ in range(4):
        logits, _ = lm(logits[:, -1].argmax(-1, keepdim=True), cache=cache)
    slots = cache.layers[0].kv.capacity  # 71 tokens held in 128 growing slots
    p = plan(cfg, slots, batch=2, dtype=dtype, compare=False)
    assert {k.mixer: k.cache_bytes for k in p.kinds} == cache.nbytes_by_type()
    # DSA per slot and row: K and V (2 x Hkv x D) plus one indexer key (Di), in the model dtype, + a validity byte
    item = torch.empty((), dtype=dtype).element_size()
    dsa = next(k for k in p.kinds if k.mixer == "dsa")
    assert dsa.kv_bytes == 2 * slots * (2 * 2 * 8 + 8) * item
    # it grows with the context (the ring buffer of sliding_window does not)
    longer = plan(cfg, 10 * slots, batch=2, dtype=dtype, compare=False)
    assert next(k for k in longer.kinds if k.mixer == "dsa").kv_bytes == 10 * dsa.kv_bytes
    window = lambda q: next(k for k in q.kinds if k.mixer == "sliding_window").cache_bytes  # noqa: E731
    assert window(longer) == window(p)


@torch.no_grad()
def test_plan_equals_actual_cache_bytes_for_fixed_size_pattern_caches():
    # longformer's cache is a ring buffer plus its pinned global tokens: fixed size, counted from its tensors
    cfg = config(["longformer", "sliding_window"])
    lm = HybridLM(cfg).eval()
    cache = lm.new_cache(2)
    lm(torch.randint(0, 40, (2, 50)), cache=cache)
    for context in (50, 5000):
        p = plan(cfg, context, batch=2, dtype=torch.float32, compare=False)
        assert {k.mixer: k.cache_bytes for k in p.kinds} == cache.nbytes_by_type()


def test_model_cache_reset_decodes_like_a_fresh_cache():
    # every cache kind of a hybrid model: ring buffer, ring + pinned globals, growing KV, DSA, recurrent state
    m = model(["sliding_window", "longformer", "bigbird", "dsa", "gated_deltanet"])
    first, second = torch.randint(0, 40, (2, 13)), torch.randint(0, 40, (2, 9))
    cache = m.new_cache(2)
    with torch.no_grad():
        m(first, cache=cache)
        cache.reset()
        assert cache.seen_tokens == 0
        got, _ = m(second, cache=cache)
        want, _ = m(second, cache=m.new_cache(2))
    assert torch.equal(got, want)
