"""Copying and selective copying: reproduce a sequence seen earlier.

**Copying** (``$ s | s .``): a start token ``$``, a random string ``s`` of ``L`` data tokens, a separator
``|``, then ``s`` again and an end token ``.``. The model reads ``$ s | s`` and must predict the second
``s`` and the ``.``; only those ``L + 1`` positions are scored. Copying ``L`` arbitrary tokens needs a
memory of ``L * log2(V)`` bits, so a fixed-size state fails once ``L`` grows past it.

**Selective copying** (Gu & Dao, Mamba): ``N`` data tokens are scattered at random positions among noise
tokens; after a separator the model must reproduce the data tokens in their order. Unlike copying, where
the answer sits at a fixed offset, the model must select content, not positions.

Token ids: the special tokens come first (documented on each class), data tokens are the rest of the
vocabulary. Inputs are the sequence without its last token, targets the sequence shifted by one, so
inputs have exactly ``seq_len`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridattn.tasks.base import IGNORE_INDEX, TaskBatch, check_len, make_batch, register_task, rng_for


def _shifted(full: np.ndarray, scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token inputs/targets from a full sequence ``[N, T + 1]`` and a bool ``[N, T + 1]`` marking the
    tokens that must be predicted."""
    targets = np.where(scored[:, 1:], full[:, 1:], IGNORE_INDEX)
    return full[:, :-1], targets


@register_task("copying")
@dataclass
class Copying:
    """``$ s | s .`` copying.

    Token ids: 0 padding (after ``.`` when ``seq_len`` is odd), 1 ``$``, 2 ``|``, 3 ``.``, data ``[4, V)``.

    Args:
        vocab_size: V, at least 5.
        seq_len: T (inputs), at least 4; the copied string has ``L = (T - 2) // 2`` tokens.
    """

    vocab_size: int = 32
    seq_len: int = 64
    name: str = "copying"

    PAD, START, SEP, END = 0, 1, 2, 3

    def __post_init__(self) -> None:
        check_len("vocab_size", self.vocab_size, 5)
        check_len("seq_len", self.seq_len, 4)

    @property
    def copy_len(self) -> int:
        return (self.seq_len - 2) // 2

    def sample(self, num_examples: int, *, seed: int, split: str = "train") -> TaskBatch:
        """``num_examples`` examples for ``(seed, split)``; ``[N, T]`` inputs/targets/mask."""
        n, length = num_examples, self.copy_len
        rng = rng_for(seed, split)
        s = rng.integers(4, self.vocab_size, size=(n, length))
        full = np.full((n, self.seq_len + 1), self.PAD, dtype=np.int64)
        full[:, 0] = self.START
        full[:, 1:length + 1] = s
        full[:, length + 1] = self.SEP
        full[:, length + 2:2 * length + 2] = s
        full[:, 2 * length + 2] = self.END
        scored = np.zeros_like(full, dtype=bool)
        scored[:, length + 2:2 * length + 3] = True
        return make_batch(*_shifted(full, scored))


@register_task("selective_copying")
@dataclass
class SelectiveCopying:
    """Selective copying: ``N`` data tokens among noise, reproduced in order after a separator.

    Token ids: 0 noise, 1 separator, data ``[2, V)``.

    Args:
        vocab_size: V, at least 3.
        seq_len: T (inputs); the noisy region has ``T - num_data`` positions.
        num_data: N, number of data tokens to copy.
    """

    vocab_size: int = 16
    seq_len: int = 64
    num_data: int = 8
    name: str = "selective_copying"

    NOISE, SEP = 0, 1

    def __post_init__(self) -> None:
        check_len("vocab_size", self.vocab_size, 3)
        check_len("num_data", self.num_data, 1)
        check_len("seq_len", self.seq_len, 2 * self.num_data)

    def sample(self, num_examples: int, *, seed: int, split: str = "train") -> TaskBatch:
        """``num_examples`` examples for ``(seed, split)``; ``[N, T]`` inputs/targets/mask."""
        n, k = num_examples, self.num_data
        region = self.seq_len - k
        rng = rng_for(seed, split)
        data = rng.integers(2, self.vocab_size, size=(n, k))
        # distinct sorted positions so the data keeps its order inside the noisy region
        pos = np.sort(np.argsort(rng.random((n, region)), axis=1)[:, :k], axis=1)
        full = np.full((n, self.seq_len + 1), self.NOISE, dtype=np.int64)
        full[np.arange(n)[:, None], pos] = data
        full[:, region] = self.SEP
        full[:, region + 1:] = data
        scored = np.zeros_like(full, dtype=bool)
        scored[:, region + 1:] = True
        return make_batch(*_shifted(full, scored))
