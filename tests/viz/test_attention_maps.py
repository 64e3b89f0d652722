"""viz attention: captured matrices are causal, softmax rows sum to one, and capturing changes nothing."""

import torch

import hybridattn.layers.attention as attention_layer
from hybridattn.cli import main
from hybridattn.models import HybridLM, ModelConfig
from hybridattn.viz.attention_maps import attention_maps, encode_text


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=32, num_layers=4, hybrid="3:1", attention=dict(num_heads=2),
                      linear=dict(num_heads=2, head_dim=8))
    return HybridLM(cfg).double()


def test_maps_are_causal_and_capture_leaves_the_model_unchanged():
    model = _model()
    ids = encode_text("key: 7, value: 9; key?", 256)                    # T = 22, not a chunk multiple
    before = model(ids)
    maps = attention_maps(model, ids)
    after = model(ids)
    assert torch.equal(before, after)
    assert attention_layer.softmax_attention.__name__ == "softmax_attention"
    assert all("_mix" not in vars(layer.mixer) for layer in model.layers)
    assert [m["kind"] for m in maps] == ["linear (implicit)"] * 3 + ["softmax"]
    assert [m["layer"] for m in maps] == [0, 1, 2, 3]
    t = ids.shape[1]
    upper = torch.ones(t, t, dtype=torch.bool).triu(1)
    for m in maps:
        assert m["weights"].shape == (2, t, t)
        assert float(m["weights"][:, upper].abs().max()) == 0.0
    torch.testing.assert_close(maps[3]["weights"].sum(-1), torch.ones(2, t), rtol=0, atol=1e-6)


def test_cli_draws_a_png(tmp_path):
    model = _model().float()
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "att.png"
    assert main(["viz", "attention", "--checkpoint", str(tmp_path / "m"), "--text", "abcab", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
