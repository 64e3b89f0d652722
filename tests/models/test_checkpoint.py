import json
import os

import pytest
import torch
from safetensors import safe_open

from hybridattn.models.config import ModelConfig
from hybridattn.models.hybrid_lm import HybridLM


@pytest.mark.parametrize("preset", ["qwen3-next-tiny", "gpt-tiny", "mamba2-tiny"])
def test_round_trip_is_exact(preset, tmp_path):
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset(preset, num_layers=4))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left
    loaded = HybridLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (2, 9))
    # the weights are bit-equal (above); two instances' forwards may round differently in BLAS: fp32 tolerance
    torch.testing.assert_close(model(ids), loaded(ids))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # safetensors, tied weight stored once
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not model.config.tie_embeddings)


def test_mismatched_config_names_tensor_and_both_shapes(tmp_path):
    model = HybridLM(ModelConfig.preset("qwen3-next-tiny", num_layers=4))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["linear"]["num_v_heads"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'layers\.0\.linear_attn\.dt_bias' has shape "
                                         r"\(4,\) in the checkpoint but the config expects \(2,\)"):
        HybridLM.from_pretrained(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = HybridLM(ModelConfig.preset("gpt-tiny"))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["norm.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'norm\.weight' \(shape \(128,\)\) is missing"):
        HybridLM.from_pretrained(tmp_path)
    weights["norm.weight"] = torch.ones(128)
    weights["extra.bias"] = torch.zeros(3)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'extra\.bias' in the checkpoint is not a parameter"):
        HybridLM.from_pretrained(tmp_path)


def test_unknown_format_and_missing_files(tmp_path):
    model = HybridLM(ModelConfig.preset("gpt-tiny"))
    with pytest.raises(ValueError, match="format: expected one of"):
        model.save_pretrained(tmp_path, format="pickle")
    with pytest.raises(FileNotFoundError, match="config.json"):
        HybridLM.from_pretrained(tmp_path / "nowhere")
