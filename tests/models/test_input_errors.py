"""Bad input gets a ValueError / TypeError naming the argument or field, expected vs received, at the public entry
point (not an exception from deep inside torch, and not accepted to fail later)."""

import math

import pytest
import torch

from hybridattn.models import HybridLM, ModelConfig
from hybridattn.models.qwen3_next_config import config_from_transformers
from hybridattn.ops import dsa_attention, gated_delta_rule, masks, retention, softmax_attention


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridLM(ModelConfig.preset("gpt-tiny", num_layers=2, d_model=32, vocab_size=64)).eval()


IDS = torch.randint(0, 64, (2, 5))


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m(IDS, logits_at=torch.tensor([True, False])), TypeError, "logits_at: expected an integer tensor"),
    (lambda m: m(IDS.to(torch.uint8)), TypeError, "input_ids: expected dtype torch.int64 or torch.int32"),
    (lambda m: m(IDS.to(torch.int16)), TypeError, "input_ids: expected dtype"),
    (lambda m: m(IDS[:0]), ValueError, r"input_ids: expected shape \[B, T\] with B >= 1"),
    (lambda m: m.generate(IDS, 3, temperature=math.nan), ValueError, "temperature: expected a finite number"),
    (lambda m: m.generate(IDS, 3, temperature=True), TypeError, "temperature: expected a float"),
    (lambda m: m.generate(IDS, 3, stop=1.0), TypeError, "stop: expected a token id"),
    (lambda m: m.generate(IDS, 3, stop=torch.tensor([1.0])), TypeError, "stop: expected an integer tensor"),
    (lambda m: m.generate(IDS, 3, stop=[1, 99]), ValueError, r"stop: expected token ids in \[0, 64\), received 99"),
])
def test_model_entry_points_name_the_argument(model, call, error, match):
    with torch.no_grad(), pytest.raises(error, match=match):
        call(model)


def test_stop_as_an_integer_tensor_is_accepted(model):
    with torch.no_grad():
        out = model.generate(IDS, 4, stop=torch.tensor([1, 2]))
        assert torch.equal(out, model.generate(IDS, 4, stop=[1, 2]))  # the same call twice: same arithmetic


@pytest.mark.parametrize("text, error, match", [
    ("", ValueError, r"config.json: expected a JSON object, the (file|text) is not JSON"),
    ("[1, 2]", TypeError, "config.json: expected a JSON object, received list"),
    ("null", TypeError, "config.json: expected a JSON object, received NoneType"),
])
def test_a_config_json_that_is_no_object_names_the_file(model, tmp_path, text, error, match):
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(error, match=match):
        HybridLM.from_pretrained(tmp_path)
    with pytest.raises(error, match=match):
        ModelConfig.from_json(tmp_path / "config.json")


def _config(**changes):
    data = ModelConfig.preset("gpt-tiny", num_layers=2, d_model=32, vocab_size=64).to_dict()
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for p in parents:
            target = target.setdefault(p, {}) if target.get(p) is not None else target.setdefault(p, {})
        target[last] = value
    return ModelConfig.from_dict(data)


@pytest.mark.parametrize("field, value, error, match", [
    ("attention", None, TypeError, "attention: expected AttentionConfig or dict, received NoneType"),
    ("ffn__intermediate_size", "64", TypeError, "ffn.intermediate_size: expected an int, received str"),
    ("ffn__intermediate_size", 64.5, TypeError, "ffn.intermediate_size: expected an int, received float"),
    ("pad_token_id", "0", TypeError, "pad_token_id: expected an int"),
    ("pad_token_id", 1.5, TypeError, "pad_token_id: expected an int"),
    ("pad_token_id", True, TypeError, "pad_token_id: expected an int, received bool"),
    ("attention__rope_theta", 0, ValueError, "attention.rope_theta: expected a finite float > 0"),
    ("attention__rope_theta", -1.0, ValueError, "attention.rope_theta: expected a finite float > 0"),
    ("attention__rope_theta", math.nan, ValueError, "attention.rope_theta: expected a finite float > 0"),
    ("attention__rope_theta", "big", TypeError, "attention.rope_theta: expected a float, received str"),
    ("initializer_range", math.inf, ValueError, "initializer_range: expected a finite float > 0"),
    ("norm_eps", math.inf, ValueError, "norm_eps: expected a finite float > 0"),
    ("attention__qk_norm", "yes", TypeError, "attention.qk_norm: expected a bool"),
])
def test_config_fields_are_checked_by_the_config(field, value, error, match):
    with pytest.raises(error, match=match):
        _config(**{field: value})


def test_moe_layer_lists_are_checked_by_the_config():
    with pytest.raises(ValueError, match="moe.mlp_only_layers: expected a list of layer indices"):
        _config(moe={"mlp_only_layers": "abc"})


def _hf(**changes):
    hf = {"model_type": "qwen3_next", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "linear_num_key_heads": 1,
          "linear_num_value_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
          "intermediate_size": 64, "num_experts": 0}
    hf.update(changes)
    return {k: v for k, v in hf.items() if v is not ...}


def test_transformers_configs_name_the_field():
    assert config_from_transformers(_hf()).num_layers == 4
    with pytest.raises(ValueError, match="full_attention_interval: expected an int >= 1, received 0"):
        config_from_transformers(_hf(full_attention_interval=0))
    with pytest.raises(ValueError, match="config.json hidden_size: a required field of a qwen3_next config"):
        config_from_transformers(_hf(hidden_size=...))


def test_op_entry_points_name_the_argument():
    q = torch.randn(1, 5, 2, 8)
    g, beta = -torch.rand(1, 5, 2), torch.rand(1, 5, 2)
    with pytest.raises(TypeError, match="cu_seqlens: expected an integer dtype"):
        gated_delta_rule(q, q, q, g, beta, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.complex64))
    with pytest.raises(TypeError, match="cu_seqlens: expected an integer dtype"):
        softmax_attention(q, q, q, mask=masks.document(torch.tensor([0.0, 2.0, 5.0])))
    with pytest.raises(ValueError, match="cu_seqlens: expected device cpu"):
        gated_delta_rule(q, q, q, g, beta, cu_seqlens=torch.tensor([0, 2, 5], device="meta"))
    with pytest.raises(TypeError, match="key_mask: expected dtype torch.bool"):
        dsa_attention(q, q, q, torch.randn(1, 5, 1, 4), torch.randn(1, 5, 4), top_k=2, key_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"^k: expected shape \(1, 6, 2, 8\)"):  # about q/k, not the decays
        retention(torch.randn(1, 6, 2, 8), q, q)
    empty = torch.randn(0, 4, 2, 8)
    for backend in ("naive", "sdpa", "tiled", "auto", "block_sparse"):
        assert softmax_attention(empty, empty, empty, causal=True, backend=backend).shape == (0, 4, 2, 8)
