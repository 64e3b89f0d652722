"""Qwen3-Next checkpoints with RoPE scaling (linear, dynamic NTK, YaRN, Llama 3, LongRoPE) against transformers, and
the exact config.json round trip (import then export gives the same file)."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is the peer these tests compare against")
pytestmark = pytest.mark.needs_transformers

from safetensors.torch import load_file  # noqa: E402

from hybridattn.bench.qwen3_next import transformers_without_fla  # noqa: E402
from hybridattn.models import HybridLM, ModelConfig  # noqa: E402
from hybridattn.models import qwen3_next  # noqa: E402

VOCAB = 61
MAX_LEN = 24  # max_position_embeddings; the sequences below run past it
SCALINGS = {
    "linear": {"factor": 3.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 8.0, "original_max_position_embeddings": 12, "beta_fast": 16.0, "beta_slow": 2.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 12},
    "longrope": {"original_max_position_embeddings": 12, "short_factor": [1.0, 1.5, 2.0, 2.5],
                 "long_factor": [3.0, 6.0, 12.0, 24.0]},
}
# config.json fields that import -> export does not give back to the letter. None: every field is either mapped
# both ways or kept in ModelConfig.source_fields.
NORMALISED: set = set()


@pytest.fixture
def hf_module(monkeypatch):
    return transformers_without_fla(monkeypatch.setattr)


def _hf_model(module, rope_parameters, **overrides):
    from transformers import Qwen3NextConfig

    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
               layer_types=["linear_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1,
               head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
               linear_value_head_dim=8, num_experts=0, initializer_range=0.3, max_position_embeddings=MAX_LEN,
               rope_parameters={"rope_theta": 100.0, "partial_rotary_factor": 0.5, **rope_parameters})
    cfg.update(overrides)
    torch.manual_seed(0)
    model = module.Qwen3NextForCausalLM(Qwen3NextConfig(**cfg)).eval()
    with torch.no_grad():  # q/k norms start at the identity: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _saved(module, tmp_path, rope_type, **overrides):
    hf = _hf_model(module, {"rope_type": rope_type, **SCALINGS.get(rope_type, {})}, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


@pytest.mark.parametrize("rope_type", sorted(SCALINGS))
def test_scaled_rope_logits_match_transformers(hf_module, tmp_path, rope_type):
    hf, path = _saved(hf_module, tmp_path, rope_type)
    ours = HybridLM.from_pretrained(path)
    assert ours.config.attention.rope_scaling["rope_type"] == rope_type
    ids = torch.randint(0, VOCAB, (2, 2 * MAX_LEN + 3))  # past max_position_embeddings and the original length
    with torch.no_grad():
        want = hf(ids).logits
        assert _rel(ours(ids), want) <= 1e-4
        # the scaling matters at this length: plain RoPE gives other logits
        plain = HybridLM(ours.config.replace(attention={**ours.config.to_dict()["attention"], "rope_scaling": None}))
        plain.load_state_dict(ours.state_dict())
        assert _rel(plain(ids), want) > 1e-3


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_scaling_matches_transformers_while_decoding(hf_module, tmp_path, rope_type):
    """Decoding across the trained length: transformers recomputes the frequencies from the largest position so
    far at each step (keys in the cache keep their rotation); hybridattn does the same from the cache's length."""
    hf, path = _saved(hf_module, tmp_path, rope_type)
    ours = HybridLM.from_pretrained(path)
    prompt = torch.randint(0, VOCAB, (1, 8))  # shorter than both lengths (12 for longrope, 24 for dynamic)
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        seq = out.sequences
        logits, cache = ours(prompt, cache=ours.new_cache(1))
        got = [logits[:, -1]]
        for t in range(prompt.shape[1], seq.shape[1] - 1):
            logits, cache = ours(seq[:, t:t + 1], cache=cache)
            got.append(logits[:, -1])
    assert _rel(torch.stack(got, 1), torch.stack(out.logits, 1)) <= 1e-4


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_config(before: dict, after: dict):
    for key in NORMALISED:
        before.pop(key, None), after.pop(key, None)
    assert after == before


@pytest.mark.parametrize("rope_type", ["default"] + sorted(SCALINGS))
def test_export_round_trip_is_exact(hf_module, tmp_path, rope_type):
    hf, path = _saved(hf_module, tmp_path, rope_type, bos_token_id=1, eos_token_id=[2, 3])
    source = json.loads((path / "config.json").read_text())
    source["a_field_hybridattn_does_not_know"] = {"kept": [1, 2.5]}
    (path / "config.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    ours = HybridLM.from_pretrained(path)
    ours.save_pretrained(tmp_path / "out", format="transformers")
    _assert_same_config(source, json.loads((tmp_path / "out" / "config.json").read_text()))
    before, after = _tensors(path), _tensors(tmp_path / "out")
    assert sorted(before) == sorted(after) and all(torch.equal(before[n], after[n]) for n in before)
    back = HybridLM.from_pretrained(tmp_path / "out")
    assert back.config == ours.config
    ids = torch.randint(0, VOCAB, (1, MAX_LEN + 5))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours(ids))  # two instances: BLAS may round differently


def test_kept_fields_survive_hybridattns_own_format(hf_module, tmp_path):
    _, path = _saved(hf_module, tmp_path, "yarn", bos_token_id=1, eos_token_id=[2, 3])
    source = json.loads((path / "config.json").read_text())
    ours = HybridLM.from_pretrained(path)
    assert ours.config.source_fields["bos_token_id"] == {"source": 1}
    ours.save_pretrained(tmp_path / "own")  # hybridattn's format
    assert ModelConfig.from_json(tmp_path / "own" / "config.json").source_fields == ours.config.source_fields
    HybridLM.from_pretrained(tmp_path / "own").save_pretrained(tmp_path / "out", format="transformers")
    _assert_same_config(source, json.loads((tmp_path / "out" / "config.json").read_text()))


def test_fields_changed_in_hybridattn_are_exported_as_they_now_are(hf_module, tmp_path):
    _, path = _saved(hf_module, tmp_path, "yarn", eos_token_id=[2, 3], pad_token_id=None)
    cfg = qwen3_next.config_from_transformers(json.loads((path / "config.json").read_text()))
    assert (cfg.eos_token_id, cfg.pad_token_id) == (2, 2)
    unchanged = qwen3_next.config_to_transformers(cfg)
    assert (unchanged["eos_token_id"], unchanged["pad_token_id"]) == ([2, 3], None)
    scaling = {**cfg.attention.rope_scaling, "factor": 2.0}
    changed = qwen3_next.config_to_transformers(cfg.replace(
        eos_token_id=5, attention={**cfg.to_dict()["attention"], "rope_scaling": scaling}))
    assert changed["eos_token_id"] == 5 and changed["pad_token_id"] is None  # pad_token_id is still 2
    assert changed["rope_parameters"]["factor"] == 2.0 and changed["max_position_embeddings"] == MAX_LEN


def test_legacy_rope_fields_import_and_round_trip():
    hf = qwen3_next.config_to_transformers(ModelConfig.preset("qwen3-next-tiny", num_layers=4))
    del hf["rope_parameters"], hf["layer_types"]
    hf.update(rope_theta=5e5, partial_rotary_factor=0.25, full_attention_interval=2, max_position_embeddings=4096,
              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})
    cfg = qwen3_next.config_from_transformers(hf)
    assert cfg.layer_types == ["gated_deltanet", "attention"] * 2
    assert (cfg.attention.rope_theta, cfg.attention.partial_rotary_factor) == (5e5, 0.25)
    assert cfg.attention.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    assert qwen3_next.config_to_transformers(cfg) == hf


def test_dynamic_and_defaults_resolved_on_import():
    base = qwen3_next.config_to_transformers(ModelConfig.preset("qwen3-next-tiny", num_layers=4))
    dyn = qwen3_next.config_from_transformers(
        {**base, "max_position_embeddings": 2048, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    assert dyn.attention.rope_scaling == {"rope_type": "dynamic", "factor": 2.0,
                                          "original_max_position_embeddings": 2048}
    yarn = qwen3_next.config_from_transformers(
        {**base, "max_position_embeddings": 2048, "original_max_position_embeddings": 512,
         "rope_parameters": {"rope_type": "yarn", "factor": None}})
    assert yarn.attention.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    nested = qwen3_next.config_from_transformers(
        {**base, "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 7.0}}})
    assert (nested.attention.rope_scaling, nested.attention.rope_theta) == ({"rope_type": "linear", "factor": 2.0}, 7.0)


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "mrope", "factor": 2.0}, r"rope_parameters.rope_type: expected one of \('default', 'linear', "
                                            r"'dynamic', 'yarn', 'llama3', 'longrope'\), received 'mrope'"),
    ({"rope_type": "llama3", "factor": 2.0}, r"config.json rope_parameters: rope_type 'llama3' expects "
                                             r"\['factor', 'high_freq_factor', 'low_freq_factor'"),
])
def test_unsupported_rope_is_named(rope, match):
    base = qwen3_next.config_to_transformers(ModelConfig.preset("qwen3-next-tiny", num_layers=4))
    with pytest.raises(ValueError, match=match):
        qwen3_next.config_from_transformers({**base, "rope_parameters": rope})


def test_rope_scaling_in_hybridattn_config_is_validated_and_saved(tmp_path):
    cfg = ModelConfig.preset("qwen3-next-tiny", num_layers=4,
                             attention={**ModelConfig.preset("qwen3-next-tiny").to_dict()["attention"],
                                        "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"attention.rope_scaling.factor: expected a positive number, received 0"):
        cfg.replace(attention={**cfg.to_dict()["attention"], "rope_scaling": {"rope_type": "linear", "factor": 0}})
    with pytest.raises(ValueError, match=r"attention.rope_scaling: expected None with attention.position='alibi'"):
        cfg.replace(attention={**cfg.to_dict()["attention"], "position": "alibi"})
