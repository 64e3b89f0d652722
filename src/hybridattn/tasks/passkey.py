"""Passkey retrieval (Mohtashami & Jaggi, 2023): a number hidden in filler text, asked for at the end.

Byte-level (vocabulary 256). An example of ``T`` input bytes is::

    The grass is green. The sky is blue. ... The pass key is 48213. Remember it. 48213 is the pass key.
    ... The sun is yellow. Here we go. What is the pass key? The pass key is 48213

with the needle inserted at a uniformly random sentence boundary of the filler (its "depth"). The model
reads everything up to the question and must produce the ``num_digits`` digits; only the positions that
predict them are scored. The filler is predictable, so a model only has to find and copy the number — a
fixed-size state that has been overwritten by ``T`` tokens of filler loses it, attention does not.
Generation is ``O(N * T)`` numpy work, so evaluation lengths of 32K tokens are cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridattn.tasks.base import IGNORE_INDEX, TaskBatch, check_len, make_batch, register_task, rng_for

FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = b"What is the pass key? The pass key is "


def _needle(key: bytes) -> bytes:
    return b"The pass key is " + key + b". Remember it. " + key + b" is the pass key. "


@register_task("passkey")
@dataclass
class Passkey:
    """Passkey retrieval.

    Args:
        seq_len: T input bytes, long enough for the needle, the question and the digits (at least 160 for
            5 digits); up to 32K and beyond.
        num_digits: number of digits in the key (the first is never 0).
        vocab_size: fixed at 256 (bytes).
    """

    seq_len: int = 1024
    num_digits: int = 5
    vocab_size: int = 256
    name: str = "passkey"

    def __post_init__(self) -> None:
        check_len("num_digits", self.num_digits, 1)
        if self.vocab_size != 256:
            raise ValueError(f"vocab_size: expected 256 (byte-level), received {self.vocab_size}")
        fixed = len(_needle(b"0" * self.num_digits)) + len(QUESTION) + self.num_digits
        check_len("seq_len", self.seq_len, fixed + len(FILLER))

    def sample(self, num_examples: int, *, seed: int, split: str = "train") -> TaskBatch:
        """``num_examples`` examples for ``(seed, split)``; ``[N, T]`` inputs/targets/mask."""
        n, d = num_examples, self.num_digits
        rng = rng_for(seed, split)
        first = rng.integers(1, 10, size=(n, 1))
        rest = rng.integers(0, 10, size=(n, d - 1))
        digits = np.concatenate([first, rest], axis=1)
        total = self.seq_len + 1
        needle_len = len(_needle(b"0" * d))
        haystack = total - len(QUESTION) - d - needle_len    # filler bytes around the needle
        tiled = np.frombuffer(FILLER * (haystack // len(FILLER) + 1), dtype=np.uint8)[:haystack]
        depth = rng.integers(0, haystack // len(FILLER) + 1, size=n) * len(FILLER)
        full = np.empty((n, total), dtype=np.int64)
        for i in range(n):
            key = (digits[i] + ord("0")).astype(np.uint8).tobytes()
            needle = np.frombuffer(_needle(key), dtype=np.uint8)
            tail = np.frombuffer(QUESTION + key, dtype=np.uint8)
            p = int(depth[i])
            full[i] = np.concatenate([tiled[:p], needle, tiled[p:], tail])
        targets = np.full((n, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        targets[:, -d:] = full[:, -d:]
        return make_batch(full[:, :-1], targets)
