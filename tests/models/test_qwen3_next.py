"""Qwen3-Next checkpoints: transformers-format import/export and logits parity with transformers' own model
(run on its PyTorch path, fla disabled)."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is the peer these tests compare against")
pytestmark = pytest.mark.needs_transformers

from safetensors.torch import load_file, save_file  # noqa: E402

from hybridattn.bench.qwen3_next import transformers_without_fla  # noqa: E402
from hybridattn.models import HybridLM  # noqa: E402
from hybridattn.models import qwen3_next  # noqa: E402

VOCAB = 101


def _hf_config(**overrides):
    from transformers import Qwen3NextConfig

    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=5,
               layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention",
                            "full_attention"],
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,  # GQA
               linear_num_key_heads=2, linear_num_value_heads=4,  # GVA: more value heads than key heads
               linear_key_head_dim=12, linear_value_head_dim=10, num_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=24, shared_expert_intermediate_size=20, mlp_only_layers=[2],
               initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 0.5})
    cfg.update(overrides)
    return Qwen3NextConfig(**cfg)


@pytest.fixture
def hf_module(monkeypatch):
    return transformers_without_fla(monkeypatch.setattr)


def _hf_model(module, **overrides):
    torch.manual_seed(0)
    model = module.Qwen3NextForCausalLM(_hf_config(**overrides)).eval()
    with torch.no_grad():  # norms start at the identity and the router at near-uniform: make both matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.2)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
    return model


@pytest.fixture
def hf_dir(hf_module, tmp_path):
    model = _hf_model(hf_module)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_config_maps_every_field(hf_dir):
    _, path = hf_dir
    cfg = qwen3_next.config_from_transformers(json.loads((path / "config.json").read_text()))
    assert cfg.layer_types == ["gated_deltanet", "attention", "gated_deltanet", "gated_deltanet", "attention"]
    assert (cfg.d_model, cfg.vocab_size, cfg.num_layers, cfg.norm, cfg.tie_embeddings) == (
        48, VOCAB, 5, "rms_zero_centred", False)
    att, lin, moe = cfg.attention, cfg.linear, cfg.moe
    assert (att.num_heads, att.kv_heads(), att.head_dim, att.partial_rotary_factor, att.rope_theta) == (
        4, 2, 16, 0.5, 10000.0)
    assert att.output_gate and att.qk_norm
    assert (lin.num_heads, lin.v_heads(), lin.head_dim, lin.v_head_dim, lin.conv_size) == (2, 4, 12, 10, 4)
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size,
            moe.shared_expert_intermediate_size, moe.mlp_only_layers) == (4, 2, 24, 20, [2])
    assert cfg.ffn.intermediate_size == 40 and cfg.norm_eps == 1e-6
    # and back: the exported config describes the same model
    assert qwen3_next.config_from_transformers(qwen3_next.config_to_transformers(cfg)) == cfg


def test_legacy_config_fields():
    legacy = qwen3_next.config_to_transformers(qwen3_next.config_from_transformers(
        _hf_config(num_hidden_layers=8, layer_types=None).to_dict()))
    del legacy["layer_types"], legacy["rope_parameters"]
    legacy.update(full_attention_interval=4, rope_theta=5e5, partial_rotary_factor=0.25, rope_scaling=None)
    cfg = qwen3_next.config_from_transformers(legacy)
    assert cfg.layer_types == ["gated_deltanet"] * 3 + ["attention"] + ["gated_deltanet"] * 3 + ["attention"]
    assert (cfg.attention.rope_theta, cfg.attention.partial_rotary_factor) == (5e5, 0.25)
    with pytest.raises(ValueError, match=r"rope_type: expected one of \('default', .*received 'su'"):
        qwen3_next.config_from_transformers({**legacy, "rope_scaling": {"rope_type": "su", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act: expected 'silu', received 'gelu'"):
        qwen3_next.config_from_transformers({**legacy, "hidden_act": "gelu"})


@pytest.mark.parametrize("batch,length", [(1, 1), (3, 37)])
def test_logits_match_transformers(hf_dir, batch, length):
    hf, path = hf_dir
    ours = HybridLM.from_pretrained(path)
    ids = torch.randint(0, VOCAB, (batch, length))
    with torch.no_grad():
        assert _rel(ours(ids), hf(ids).logits) <= 1e-4


def test_logits_match_transformers_with_left_padding(hf_dir):
    hf, path = hf_dir
    ours = HybridLM.from_pretrained(path)
    ids = torch.randint(0, VOCAB, (3, 29))
    mask = torch.ones(3, 29, dtype=torch.bool)
    mask[0, :7] = False
    mask[2, :20] = False
    # transformers counts positions from the first real token only when told so
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask.long(), position_ids=positions).logits
        got = ours(ids, token_mask=mask)
    assert _rel(got[mask], want[mask]) <= 1e-4


def test_greedy_generation_matches_transformers(hf_dir):
    hf, path = hf_dir
    ours = HybridLM.from_pretrained(path)
    prompt = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        got = ours.generate(prompt, max_new_tokens=32, temperature=0.0)
    assert got.shape == (2, 11 + 32)
    assert torch.equal(got, want)


@pytest.mark.slow  # ~12 s alone, over a minute on the loaded shared machine
def test_chunked_prefill_2048_tokens_matches_transformers(hf_dir):
    # Several 64-token chunks and the state hand-off between them, plus a recurrent step after the prefill.
    hf, path = hf_dir
    ours = HybridLM.from_pretrained(path)
    ids = torch.randint(0, VOCAB, (1, 2049))
    with torch.no_grad():
        want = hf(ids).logits
        logits, cache = ours(ids[:, :2048], cache=ours.new_cache(1))
        step, _ = ours(ids[:, 2048:], cache=cache)
    assert _rel(logits, want[:, :2048]) <= 1e-4
    assert _rel(step, want[:, 2048:]) <= 1e-4


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_export_round_trip_is_exact(hf_dir, hf_module, tmp_path):
    hf, path = hf_dir
    ours = HybridLM.from_pretrained(path)
    ours.save_pretrained(tmp_path / "out", format="transformers")
    before, after = _tensors(path), _tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    # transformers reads the export back to the same model
    back = hf_module.Qwen3NextForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        # two model instances: equal weights at other addresses may take other BLAS paths; fp32 tolerance
        torch.testing.assert_close(back(ids).logits, hf(ids).logits)


def test_sharded_checkpoints_both_ways(hf_dir, hf_module, tmp_path):
    hf, _ = hf_dir
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = HybridLM.from_pretrained(tmp_path / "sharded")
    qwen3_next.save(ours, tmp_path / "ours", max_shard_size=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = hf_module.Qwen3NextForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits)  # two instances: fp32 tolerance
        assert _rel(ours(ids), hf(ids).logits) <= 1e-4


def test_decoder_sparse_step_and_unnormalised_top_k(hf_module, tmp_path):
    hf = _hf_model(hf_module, decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False, num_experts_per_tok=3)
    hf.save_pretrained(tmp_path / "step2")
    ours = HybridLM.from_pretrained(tmp_path / "step2")
    assert [type(layer.mlp).__name__ for layer in ours.layers] == ["SwiGLU", "MoEFeedForward"] * 2 + ["SwiGLU"]
    ids = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        assert _rel(ours(ids), hf(ids).logits) <= 1e-4


def test_tied_embeddings_dense_model(hf_module, tmp_path):
    hf = _hf_model(hf_module, tie_word_embeddings=True, num_experts=0)
    hf.save_pretrained(tmp_path / "tied")
    ours = HybridLM.from_pretrained(tmp_path / "tied")
    assert ours.lm_head.weight is ours.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        assert _rel(ours(ids), hf(ids).logits) <= 1e-4


def _edit_checkpoint(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_dir):
    _, path = hf_dir
    _edit_checkpoint(path, lambda t: t.pop("model.layers.3.linear_attn.A_log"))
    with pytest.raises(ValueError, match=r"1 missing tensor\(s\): model\.layers\.3\.linear_attn\.A_log"):
        HybridLM.from_pretrained(path)


def test_unknown_tensor_is_named(hf_dir):
    _, path = hf_dir
    _edit_checkpoint(path, lambda t: t.update({"model.layers.0.linear_attn.extra": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"1 unknown tensor\(s\): model\.layers\.0\.linear_attn\.extra"):
        HybridLM.from_pretrained(path)


def test_wrong_shape_is_named_with_both_shapes(hf_dir):
    _, path = hf_dir
    _edit_checkpoint(path, lambda t: t.update({"model.norm.weight": torch.zeros(47)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight: expected \(48,\), received \(47,\)"):
        HybridLM.from_pretrained(path)


def test_mtp_tensors_are_ignored_with_a_warning(hf_dir):
    hf, path = hf_dir
    extra = {"mtp.fc.weight": torch.zeros(48, 96), "mtp.norm.weight": torch.zeros(48)}
    _edit_checkpoint(path, lambda t: t.update(extra))
    with pytest.warns(UserWarning, match=r"ignoring 2 multi-token-prediction tensors \(mtp\.\*"):
        ours = HybridLM.from_pretrained(path)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert _rel(ours(ids), hf(ids).logits) <= 1e-4


def test_stacked_expert_layout_is_read(hf_dir):
    # transformers >= 5 keeps experts stacked in memory; a checkpoint written that way loads the same.
    hf, path = hf_dir

    def stack(t):
        for i in (0, 1, 3, 4):
            p = f"model.layers.{i}.mlp.experts"
            gate = [t.pop(f"{p}.{e}.gate_proj.weight") for e in range(4)]
            up = [t.pop(f"{p}.{e}.up_proj.weight") for e in range(4)]
            t[f"{p}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
            t[f"{p}.down_proj"] = torch.stack([t.pop(f"{p}.{e}.down_proj.weight") for e in range(4)])

    _edit_checkpoint(path, stack)
    ours = HybridLM.from_pretrained(path)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert _rel(ours(ids), hf(ids).logits) <= 1e-4


def test_bfloat16_checkpoint_keeps_its_dtype(hf_module, tmp_path):
    hf = _hf_model(hf_module).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    ours = HybridLM.from_pretrained(tmp_path / "bf16")
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    ours.save_pretrained(tmp_path / "again", format="transformers")
    before, after = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "again")
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == torch.bfloat16 for n in before)


def test_export_refuses_models_transformers_cannot_express():
    from hybridattn.models import ModelConfig

    cfg = qwen3_next.config_from_transformers(_hf_config().to_dict()).replace(norm="rms")
    with pytest.raises(ValueError, match="norm: expected 'rms_zero_centred' to export as Qwen3-Next, received 'rms'"):
        qwen3_next.config_to_transformers(cfg)
    with pytest.raises(ValueError, match=r"layers\[0\]: expected 'gated_deltanet' or 'attention'"):
        qwen3_next.config_to_transformers(ModelConfig(layers=["gla", "attention"], num_layers=2))
