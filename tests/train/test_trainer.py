"""Trainer: schedule, loss only at scored positions, learning on a tiny task, checkpoints round-trip."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from toy_model import ToyLM  # noqa: E402

from hybridattn.tasks import MQAR, Copying  # noqa: E402
from hybridattn.train import TrainConfig, Trainer, evaluate, load_checkpoint, lr_at, save_checkpoint  # noqa: E402
from hybridattn.train.trainer import batch_seed, scored_logits  # noqa: E402


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)            # half way: cos(pi/2) = 0
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(TypeError, match="steps"):
        TrainConfig(steps=1.5)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        Trainer(ToyLM(16), Copying(vocab_size=16, seq_len=8), TrainConfig(checkpoint_every=1))


class _PositionsModel(ToyLM):
    """Accepts logits_at positions [B, P] and returns [B, P, V], as HybridLM does."""

    calls = 0

    def forward(self, input_ids, *, logits_at=None):
        logits = super().forward(input_ids)
        if logits_at is None:
            return logits
        type(self).calls += 1
        return torch.gather(logits, 1, logits_at.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def test_loss_only_at_scored_positions_and_logits_at_used():
    torch.manual_seed(0)
    task = MQAR(vocab_size=32, seq_len=24, num_kv_pairs=3)
    model = _PositionsModel(32, max_len=24)
    batch = task.sample(4, seed=0)
    picked = scored_logits(model, batch)
    assert _PositionsModel.calls == 1 and picked.shape == (12, 32)
    full = ToyLM.forward(model, batch.inputs)
    torch.testing.assert_close(picked, full[batch.mask])  # logits_at runs other shapes: fp32 tolerance
    # the trainer's loss equals the mean CE over scored positions only
    trainer = Trainer(model, task, TrainConfig(steps=1, batch_size=4, progress=False, eval_examples=4))
    first = trainer.task.sample(4, seed=batch_seed(0, 0))
    with torch.no_grad():
        expected = F.cross_entropy(ToyLM.forward(model, first.inputs)[first.mask], first.targets[first.mask])
    record = trainer.train_step()
    assert record["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_loss_decreases_and_accuracy_rises_on_copying():
    torch.manual_seed(0)
    task = Copying(vocab_size=8, seq_len=12)
    model = ToyLM(8, d_model=32, max_len=12)
    before = evaluate(model, task, 64)
    cfg = TrainConfig(steps=100, batch_size=16, lr=3e-3, warmup_steps=10, eval_examples=64, progress=False)
    result = Trainer(model, task, cfg).fit()
    first = sum(r["loss"] for r in result.history[:10]) / 10
    last = sum(r["loss"] for r in result.history[-10:]) / 10
    assert last < 0.5 * first
    assert before["accuracy"] < 0.35 and result.final["accuracy"] > 0.8
    assert result.final["scored"] == 64 * 6 and result.tokens_per_s > 0


def test_checkpoint_roundtrip_restores_model_optimizer_rng_and_writes_no_pickle(tmp_path):
    torch.manual_seed(0)
    task = MQAR(vocab_size=32, seq_len=16, num_kv_pairs=2)
    model = ToyLM(32, max_len=16)
    model.head.weight = model.embed.weight                                   # tied weights stored once
    trainer = Trainer(model, task, TrainConfig(steps=3, batch_size=4, progress=False))
    for _ in range(3):
        trainer.train_step()
    save_checkpoint(tmp_path, model=model, optimizer=trainer.optimizer, step=3, state={"note": "x"})
    rng_after_save = torch.rand(3)
    files = sorted(p.name for p in (tmp_path / "step-00000003").iterdir())
    assert files == ["manifest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"step": 3, "path": "step-00000003"}

    torch.manual_seed(123)
    clone = ToyLM(32, max_len=16)
    clone.head.weight = clone.embed.weight
    other = Trainer(clone, task, TrainConfig(steps=3, batch_size=4, progress=False))
    state = load_checkpoint(tmp_path, model=clone, optimizer=other.optimizer)
    assert state["step"] == 3 and state["note"] == "x"
    assert torch.equal(torch.rand(3), rng_after_save)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    sa, sb = trainer.optimizer.state_dict(), other.optimizer.state_dict()
    for idx in sa["state"]:
        for key in sa["state"][idx]:
            assert torch.equal(sa["state"][idx][key], sb["state"][idx][key])
    assert sa["param_groups"] == sb["param_groups"]
    assert load_checkpoint(tmp_path / "empty", model=clone) is None


def test_checkpoints_keep_the_latest_two(tmp_path):
    model = ToyLM(16, max_len=8)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model=model, optimizer=opt, step=step, state={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000002", "step-00000003"]
    assert not math.isnan(float(next(model.parameters()).detach().sum()))


def test_bf16_autocast_step_matches_fp32_to_bf16_precision():
    task = MQAR(vocab_size=32, seq_len=16, num_kv_pairs=2)
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = ToyLM(32, max_len=16)
        trainer = Trainer(model, task, TrainConfig(steps=1, batch_size=8, bf16=bf16, progress=False))
        losses[bf16] = trainer.train_step()["loss"]
    # bf16 keeps 8 mantissa bits: relative error of a ~3.5-nat loss stays well inside 2^-6
    assert losses[True] != losses[False]
    assert losses[True] == pytest.approx(losses[False], rel=2 ** -6)


def test_stop_accuracy_ends_the_run_at_the_first_evaluation_that_reaches_it():
    torch.manual_seed(0)
    task = Copying(vocab_size=12, seq_len=12)
    model = ToyLM(12, max_len=12)
    calls = []
    trainer = Trainer(model, task, TrainConfig(steps=40, batch_size=8, progress=False, eval_every=5,
                                               stop_accuracy=1e-9, eval_examples=16))
    trainer.evaluate = lambda num_examples=None: calls.append(trainer.step) or {"loss": 1.0, "accuracy": 0.5}
    result = trainer.fit()
    assert result.stopped_early and trainer.step == 5 and calls == [5]  # the final evaluation is that one
    assert result.final == {"loss": 1.0, "accuracy": 0.5} and result.evals[-1]["step"] == 5
    with pytest.raises(ValueError, match="stop_accuracy: expected eval_every > 0"):
        TrainConfig(stop_accuracy=0.9)
    with pytest.raises(ValueError, match=r"stop_accuracy: expected None or a float in \(0, 1\]"):
        TrainConfig(stop_accuracy=1.5, eval_every=5)


def test_a_task_vocabulary_larger_than_the_model_s_is_one_clear_error():
    from hybridattn.models import HybridLM, ModelConfig

    model = HybridLM(ModelConfig.preset("gpt-tiny", vocab_size=64, num_layers=1, d_model=32))
    with pytest.raises(ValueError, match="task: its vocabulary has 128 tokens but the model's has 64"):
        Trainer(model, MQAR(vocab_size=128, seq_len=32, num_kv_pairs=4), TrainConfig(steps=2, progress=False))
