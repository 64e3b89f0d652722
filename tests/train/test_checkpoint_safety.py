"""Nothing lost: cleanup never removes the checkpoint latest.json points at, resume falls back to the newest
checkpoint that verifies, and a run refuses to continue another run's checkpoint under other settings."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_model import ToyLM  # noqa: E402

from hybridattn.tasks import Copying  # noqa: E402
from hybridattn.train import TrainConfig, Trainer, load_checkpoint, save_checkpoint  # noqa: E402
from hybridattn.train.checkpoint import CheckpointError, find_checkpoint  # noqa: E402


def _save(directory, step, model=None):
    model = model or ToyLM(16, max_len=8)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(directory, model=model, optimizer=opt, step=step, state={"marker": step})


def _dirs(path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith("step-"))


def test_cleanup_keeps_the_new_checkpoint_beside_higher_numbered_ones(tmp_path):
    for step in (500, 600):  # an earlier run's checkpoints
        _save(tmp_path, step)
    (tmp_path / "latest.json").unlink()  # the user removed the pointer and started again
    for step in (10, 20, 30):
        _save(tmp_path, step)
        pointer = json.loads((tmp_path / "latest.json").read_text())
        assert (tmp_path / pointer["path"]).is_dir() and pointer["step"] == step
    # the new run keeps its two newest; the other run's higher-numbered directories are not touched
    assert _dirs(tmp_path) == ["step-00000020", "step-00000030", "step-00000500", "step-00000600"]
    assert load_checkpoint(tmp_path, model=ToyLM(16, max_len=8))["marker"] == 30


@pytest.mark.parametrize("damage", ["truncate_pointer", "pointer_to_nothing", "truncate_weights", "flip_a_byte",
                                    "drop_manifest_file"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    if damage == "truncate_pointer":
        (tmp_path / "latest.json").write_text('{"step": 2, "pa')
        want = 2  # the pointer is gone but step 2 itself verifies
    elif damage == "pointer_to_nothing":
        (tmp_path / "latest.json").write_text(json.dumps({"step": 9, "path": "step-00000009"}))
        want = 2
    elif damage == "truncate_weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
        want = 1
    elif damage == "flip_a_byte":
        data = bytearray((newest / "optimizer.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (newest / "optimizer.safetensors").write_bytes(bytes(data))
        want = 1
    else:
        (newest / "rng.safetensors").unlink()
        want = 1
    with pytest.warns(RuntimeWarning, match=f"resuming from step-0000000{want}"):
        state = load_checkpoint(tmp_path, model=ToyLM(16, max_len=8))
    assert state["marker"] == want


def test_no_checkpoint_that_verifies_is_an_error_naming_each(tmp_path):
    path = _save(tmp_path, 1)
    (path / "trainer.json").write_text("{")
    with pytest.raises(CheckpointError, match="no step directory .* verifies: .*trainer.json has 1 bytes"):
        find_checkpoint(tmp_path)


def test_a_checkpoint_without_manifest_still_loads_when_its_files_parse(tmp_path):
    path = _save(tmp_path, 3)
    (path / "manifest.json").unlink()
    assert load_checkpoint(tmp_path, model=ToyLM(16, max_len=8))["marker"] == 3
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="model.safetensors is unreadable"):
        find_checkpoint(tmp_path)


def _trainer(directory, **overrides):
    torch.manual_seed(0)
    config = dict(steps=4, batch_size=4, progress=False, checkpoint_every=2, lr=1e-3, seed=0)
    config.update(overrides)
    allow = config.pop("allow", ())
    return Trainer(ToyLM(12, max_len=12), Copying(vocab_size=12, seq_len=12), TrainConfig(**config),
                   checkpoint_dir=directory, allow_changed=allow)


def test_resuming_under_another_train_config_is_refused_with_the_differences(tmp_path):
    _trainer(tmp_path).fit()
    with pytest.raises(ValueError, match=r"other settings \(lr 0.001 -> 0.002, seed 0 -> 1\)"):
        _trainer(tmp_path, lr=2e-3, seed=1).fit()
    with pytest.raises(ValueError, match=r"batch_size 4 -> 8"):
        _trainer(tmp_path, batch_size=8).fit()
    # settings that do not change what is trained may differ
    assert _trainer(tmp_path, eval_every=1, checkpoint_every=1).fit().resumed_from == 4
    # more steps only when asked for
    with pytest.raises(ValueError, match=r"steps 4 -> 6.*allow_changed=\('steps',\)"):
        _trainer(tmp_path, steps=6).fit()
    result = _trainer(tmp_path, steps=6, allow=("steps",)).fit()
    assert result.resumed_from == 4 and result.history[-1]["step"] == 6
    with pytest.raises(ValueError, match="allow_changed: expected TrainConfig field names"):
        _trainer(tmp_path, allow=("learning_rate",))
