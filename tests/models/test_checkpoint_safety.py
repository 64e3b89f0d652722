"""save_pretrained replaces a directory as one unit; from_pretrained refuses a config from another save and
tensors of a non-floating dtype."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridattn.models import checkpoint
from hybridattn.models.config import ModelConfig
from hybridattn.models.hybrid_lm import HybridLM


def _model(**overrides):
    torch.manual_seed(0)
    return HybridLM(ModelConfig.preset("gpt-tiny", num_layers=2, d_model=32, vocab_size=64, **overrides))


def test_a_save_killed_before_the_swap_leaves_the_previous_save_whole(tmp_path, monkeypatch):
    old = _model()
    old.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    new = _model(attention={"rope_theta": 1234.0})

    def killed(*args, **kwargs):  # the process dies after writing the new files, before the swap
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_exchange", killed)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path / "m")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary directory left
    new.save_pretrained(tmp_path / "m")
    assert HybridLM.from_pretrained(tmp_path / "m").config == new.config


def test_the_two_rename_fallback_replaces_the_directory_and_keeps_other_files(tmp_path, monkeypatch):
    _model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    (tmp_path / "m" / "notes").mkdir()
    (tmp_path / "m" / "notes" / "a.txt").write_text("kept")
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)  # no renameat2 on this platform
    new = _model(attention={"rope_theta": 99.0})
    new.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors", "notes", "tokenizer.json"]
    assert (tmp_path / "m" / "notes" / "a.txt").read_text() == "kept"
    assert HybridLM.from_pretrained(tmp_path / "m").config == new.config
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_weights_beside_the_config_of_another_save_are_refused(tmp_path):
    a, b = _model(), _model(attention={"rope_theta": 777.0})  # same shapes, another model
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "b" / "config.json", tmp_path / "a" / "config.json")  # the pair of a half-done save
    with pytest.raises(ValueError, match="is not the config saved with model.safetensors"):
        HybridLM.from_pretrained(tmp_path / "a")
    loaded = HybridLM.from_pretrained(tmp_path / "a", allow_edited_config=True)  # edited on purpose
    assert loaded.config.attention.rope_theta == 777.0


def test_weights_of_an_integer_dtype_are_refused_naming_the_tensor(tmp_path):
    _model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    tensors["embed_tokens.weight"] = (tensors["embed_tokens.weight"] * 100).to(torch.int64)
    meta = {"format": "pt"}  # no config record: written by another tool
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="'embed_tokens.weight' has dtype torch.int64 in the checkpoint but the "
                                         "model expects torch.float32"):
        HybridLM.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["d_model"] == 32


def test_a_training_checkpoint_directory_loads_its_final_model_or_its_newest_step(tmp_path):
    from hybridattn.tasks import Copying
    from hybridattn.train import TrainConfig, Trainer

    model = _model()
    task = Copying(vocab_size=64, seq_len=12)
    Trainer(model, task, TrainConfig(steps=4, batch_size=4, checkpoint_every=2, progress=False),
            checkpoint_dir=tmp_path / "run").fit()
    with pytest.warns(UserWarning, match="without a final model: loading its newest checkpoint, step-00000004"):
        loaded = HybridLM.from_pretrained(tmp_path / "run")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name  # the weights themselves: bytes written and read back
    model.save_pretrained(tmp_path / "run" / "final")
    with pytest.warns(UserWarning, match="loading its final model"):
        HybridLM.from_pretrained(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="expected config.json in .* or a training checkpoint directory"):
        HybridLM.from_pretrained(tmp_path / "nothing-here")
