"""Induction heads: after ``... A B ... A``, predict ``B``.

Each example is ``T`` random data tokens; a trigger token (id 0) is placed once at a random position ``p``
(``0 <= p <= T - 3``), the token after it is the answer, and the last position holds the trigger again.
Only the last position is scored: its target is the token that followed the first trigger. This is the
induction-heads task of H3 and Mamba, the two-layer circuit (previous-token head + copy head) that makes
in-context learning work in transformers.

Token ids: 0 trigger, data ``[1, V)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridattn.tasks.base import IGNORE_INDEX, TaskBatch, check_len, make_batch, register_task, rng_for


@register_task("induction")
@dataclass
class Induction:
    """Induction heads.

    Args:
        vocab_size: V, at least 2.
        seq_len: T, at least 3.
    """

    vocab_size: int = 16
    seq_len: int = 64
    name: str = "induction"

    TRIGGER = 0

    def __post_init__(self) -> None:
        check_len("vocab_size", self.vocab_size, 2)
        check_len("seq_len", self.seq_len, 3)

    def sample(self, num_examples: int, *, seed: int, split: str = "train") -> TaskBatch:
        """``num_examples`` examples for ``(seed, split)``; ``[N, T]`` inputs/targets/mask."""
        n, t = num_examples, self.seq_len
        rng = rng_for(seed, split)
        inputs = rng.integers(1, self.vocab_size, size=(n, t))
        trigger_pos = rng.integers(0, t - 2, size=n)
        rows = np.arange(n)
        inputs[rows, trigger_pos] = self.TRIGGER
        inputs[:, -1] = self.TRIGGER
        targets = np.full((n, t), IGNORE_INDEX, dtype=np.int64)
        targets[:, -1] = inputs[rows, trigger_pos + 1]
        return make_batch(inputs, targets)
