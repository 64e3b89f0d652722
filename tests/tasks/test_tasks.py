"""Task generators: determinism, and the definitions each docstring states, checked on concrete examples."""

import math

import numpy as np
import pytest
import torch

from hybridattn.tasks import (
    IGNORE_INDEX, MQAR, TASKS, Copying, Induction, Passkey, SelectiveCopying, TextLM, bits_per_byte, build_task,
)
from hybridattn.tasks.passkey import FILLER, QUESTION

SMALL = {
    "mqar": dict(vocab_size=64, seq_len=40, num_kv_pairs=5),
    "copying": dict(vocab_size=12, seq_len=21),
    "selective_copying": dict(vocab_size=9, seq_len=33, num_data=6),
    "induction": dict(vocab_size=7, seq_len=19),
    "passkey": dict(seq_len=400, num_digits=5),
    "text": dict(seq_len=37, max_bytes=200_000),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_deterministic_split_separated_and_consistent(name):
    task = build_task(name, **SMALL[name])
    a, b = task.sample(8, seed=3), task.sample(8, seed=3)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, task.sample(8, seed=4).inputs)
    assert not torch.equal(a.inputs, task.sample(8, seed=3, split="eval").inputs)
    assert a.inputs.shape == (8, task.seq_len) and a.inputs.dtype == torch.int64
    assert torch.equal(a.mask, a.targets != IGNORE_INDEX)
    assert int(a.inputs.min()) >= 0 and int(a.inputs.max()) < task.vocab_size
    assert int(a.targets[a.mask].min()) >= 0 and int(a.targets[a.mask].max()) < task.vocab_size
    assert set(TASKS) >= set(SMALL)


def test_mqar_matches_zoology_definition():
    task = MQAR(vocab_size=64, seq_len=40, num_kv_pairs=5, power_a=0.01)
    batch = task.sample(200, seed=0)
    x, y, k = batch.inputs.numpy(), batch.targets.numpy(), 5
    keys, values = x[:, 0:2 * k:2], x[:, 1:2 * k:2]
    assert ((keys >= 1) & (keys < 32)).all() and ((values >= 32) & (values < 64)).all()
    assert all(len(set(r)) == k for r in keys) and all(len(set(r)) == k for r in values)
    assert (batch.mask.sum(1) == k).all()
    for row in range(200):
        pos = np.flatnonzero(batch.mask[row].numpy())
        assert (pos >= 2 * k).all() and ((pos - 2 * k) % 2 == 0).all()
        assert sorted(x[row, pos].tolist()) == sorted(keys[row].tolist())     # every key is queried once
        answer = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert [answer[q] for q in x[row, pos]] == y[row, pos].tolist()


def test_mqar_gaps_follow_the_power_law():
    # p(g) ∝ a (g+1)^(a-1) with a=0.01 is ~1/(g+1): the first slot gets ~ 1/H(15) ≈ 30% of the first draws
    task = MQAR(vocab_size=64, seq_len=34, num_kv_pairs=1, power_a=0.01)    # one query, 16 slots
    gaps = (np.flatnonzero(task.sample(4000, seed=1).mask.numpy().reshape(-1)) % 34 - 2) // 2
    hist = np.bincount(gaps, minlength=16) / len(gaps)
    p = 0.01 * np.arange(1, 17) ** (0.01 - 1)
    p /= p.sum()
    # 4000 draws: binomial standard error <= sqrt(.3*.7/4000) ~ 0.0073; 4 sigma
    np.testing.assert_allclose(hist, p, atol=0.03)
    uniform = MQAR(vocab_size=64, seq_len=34, num_kv_pairs=1, power_a=1.0)
    gaps_u = (np.flatnonzero(uniform.sample(4000, seed=1).mask.numpy().reshape(-1)) % 34 - 2) // 2
    np.testing.assert_allclose(np.bincount(gaps_u, minlength=16) / 4000, np.full(16, 1 / 16), atol=0.03)


def test_mqar_rejects_sizes_that_cannot_hold_the_queries():
    with pytest.raises(ValueError, match="seq_len"):
        MQAR(vocab_size=64, seq_len=15, num_kv_pairs=4)
    with pytest.raises(ValueError, match="vocab_size"):
        MQAR(vocab_size=8, seq_len=64, num_kv_pairs=4)


def test_copying_layout():
    task = Copying(vocab_size=12, seq_len=21)           # L = 9, one padding slot
    b = task.sample(5, seed=0)
    x, y = b.inputs.numpy(), b.targets.numpy()
    s = x[:, 1:10]
    assert (x[:, 0] == Copying.START).all() and (x[:, 10] == Copying.SEP).all()
    assert ((s >= 4) & (s < 12)).all()
    np.testing.assert_array_equal(x[:, 11:20], s)
    assert (x[:, 20] == Copying.END).all()
    np.testing.assert_array_equal(np.flatnonzero(b.mask[0].numpy()), np.arange(10, 20))
    np.testing.assert_array_equal(y[:, 10:19], s)
    assert (y[:, 19] == Copying.END).all()


def test_selective_copying_reproduces_data_in_order():
    task = SelectiveCopying(vocab_size=9, seq_len=33, num_data=6)
    b = task.sample(20, seed=0)
    x, y = b.inputs.numpy(), b.targets.numpy()
    region = 33 - 6
    for row in range(20):
        data = x[row, :region][x[row, :region] != SelectiveCopying.NOISE]
        assert len(data) == 6 and (data >= 2).all()
        assert x[row, region] == SelectiveCopying.SEP
        np.testing.assert_array_equal(np.flatnonzero(b.mask[row].numpy()), np.arange(region, 33))
        np.testing.assert_array_equal(y[row, region:], data)


def test_induction_answer_follows_the_first_trigger():
    b = Induction(vocab_size=7, seq_len=19).sample(50, seed=0)
    x, y = b.inputs.numpy(), b.targets.numpy()
    for row in range(50):
        trig = np.flatnonzero(x[row] == Induction.TRIGGER)
        assert len(trig) == 2 and trig[1] == 18 and trig[0] <= 16
        assert np.flatnonzero(b.mask[row].numpy()).tolist() == [18]
        assert y[row, 18] == x[row, trig[0] + 1] != Induction.TRIGGER


@pytest.mark.parametrize("seq_len", [400, 32768])
def test_passkey_hides_the_number_and_asks_for_it(seq_len):
    b = Passkey(seq_len=seq_len, num_digits=5).sample(3, seed=0)
    for row in range(3):
        text = bytes(b.inputs[row].tolist())
        key = bytes(b.targets[row, -5:].tolist())
        assert key.isdigit() and key[:1] != b"0"
        assert text.count(b"The pass key is " + key + b". Remember it.") == 1
        assert text.endswith(QUESTION + key[:4])
        assert np.flatnonzero(b.mask[row].numpy()).tolist() == list(range(seq_len - 5, seq_len))
        assert text.startswith(FILLER[:20]) or text.startswith(b"The pass key is")
    depths = [bytes(r.tolist()).index(b"The pass key") for r in Passkey(seq_len=2000).sample(40, seed=1).inputs]
    assert len(set(depths)) > 5


def test_text_split_is_deterministic_and_held_out(tmp_path):
    task = TextLM(seq_len=37, max_bytes=200_000)
    train, held = task.split_bytes("train"), task.split_bytes("eval")
    assert len(train) == 200_000 and len(held) == 20_000
    b = task.sample(4, seed=0)
    np.testing.assert_array_equal(b.inputs[:, 1:].numpy(), b.targets[:, :-1].numpy())
    assert bool(b.mask.all())
    # every window is a substring of its split
    assert bytes(b.inputs[0].tolist()) + bytes([int(b.targets[0, -1])]) in train.tobytes()
    e = task.sample(2, seed=0, split="eval")
    assert bytes(e.inputs[0].tolist()) in held.tobytes()
    assert math.isclose(bits_per_byte(math.log(256)), 8.0)

    f = tmp_path / "mine.txt"
    f.write_bytes(b"abcdefghij" * 100)
    user = TextLM(seq_len=8, data=str(f))
    assert len(user.split_bytes("train")) == 900 and len(user.split_bytes("eval")) == 100
    with pytest.raises(ValueError, match="data"):
        TextLM(seq_len=8, data=str(tmp_path / "missing")).sample(1, seed=0)


def test_registry_rejects_unknown_task():
    with pytest.raises(ValueError, match="task"):
        build_task("nope")


def test_a_text_directory_of_few_files_splits_by_bytes(tmp_path):
    import zlib

    from hybridattn.tasks.text import load_corpus

    names = [n for n in (f"f{i}.txt" for i in range(40)) if zlib.crc32(n.encode()) % 10][:2]  # no file held out
    for name in names:
        (tmp_path / name).write_text(f"{name} " * 200)
    train, held = load_corpus(str(tmp_path))
    total = sum(len((tmp_path / n).read_bytes()) for n in names)
    assert len(held) == total // 10 and len(train) == total - total // 10
