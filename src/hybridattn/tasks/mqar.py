"""Multi-query associative recall (MQAR), as zoology defines it (Arora, Eyuboglu et al., 2023).

An example of length ``T`` with ``K`` key-value pairs over a vocabulary of ``V`` tokens::

    k1 v1 k2 v2 ... kK vK | x x k3 x x x k1 x ... x
    \\------ 2K -------/    \\------- T - 2K -------/

- keys are ``K`` distinct tokens from ``[1, V // 2)``, values ``K`` distinct tokens from ``[V // 2, V)``;
- every key is queried once after the pairs: key ``i`` sits at position ``2K + 2 * gap_i``, with the gaps
  drawn without replacement from ``[0, (T - 2K) // 2)`` with probability ``p(g) ∝ a * (g + 1) ** (a - 1)``
  (a power law: most queries come soon after the pairs, a few far away; ``power_a = 1`` is uniform);
- the model must output the key's value right after reading the query key; only these ``K`` positions are
  scored;
- every other position after the pairs holds a uniformly random token from ``[0, V)``
  (``random_non_queries=True``, zoology's default) or 0.

A model with a recurrent state must hold all ``K`` pairs in that state to answer, which is why the task
separates softmax attention (which looks the key up) from linear attention with a small state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridattn.tasks.base import IGNORE_INDEX, TaskBatch, check_len, make_batch, register_task, rng_for, \
    sample_without_replacement


@register_task("mqar")
@dataclass
class MQAR:
    """Multi-query associative recall.

    Args:
        vocab_size: V, at least ``2 * (num_kv_pairs + 1)`` so keys and values can be distinct.
        seq_len: T, at least ``4 * num_kv_pairs`` (pairs plus one slot per query).
        num_kv_pairs: K, the number of pairs to remember.
        power_a: power-law exponent of the query gaps (zoology: 0.01).
        random_non_queries: fill non-query positions with random tokens instead of 0.

    Raises:
        ValueError: sizes that cannot hold the pairs and their queries.
    """

    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int = 16
    power_a: float = 0.01
    random_non_queries: bool = True
    name: str = "mqar"

    def __post_init__(self) -> None:
        check_len("num_kv_pairs", self.num_kv_pairs, 1)
        check_len("vocab_size", self.vocab_size, 2 * (self.num_kv_pairs + 1))
        check_len("seq_len", self.seq_len, 4 * self.num_kv_pairs)
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a: expected a float in (0, 1], received {self.power_a}")

    @property
    def query_space(self) -> int:
        """Number of query slots after the pairs: ``(T - 2K) // 2``."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    def sample(self, num_examples: int, *, seed: int, split: str = "train") -> TaskBatch:
        """Generate ``num_examples`` examples (``[N, T]`` inputs/targets/mask) for ``(seed, split)``."""
        n, k, t, v = num_examples, self.num_kv_pairs, self.seq_len, self.vocab_size
        rng = rng_for(seed, split)
        half = v // 2
        keys = 1 + sample_without_replacement(rng, n, half - 1, k)          # (N, K) in [1, V/2)
        values = half + sample_without_replacement(rng, n, v - half, k)     # (N, K) in [V/2, V)
        g = np.arange(1, self.query_space + 1, dtype=np.float64)
        log_p = np.log(self.power_a) + (self.power_a - 1) * np.log(g)
        gaps = sample_without_replacement(rng, n, self.query_space, k, log_weights=log_p)  # (N, K)

        if self.random_non_queries:
            inputs = rng.integers(0, v, size=(n, t))
        else:
            inputs = np.zeros((n, t), dtype=np.int64)
        inputs[:, 0:2 * k:2] = keys
        inputs[:, 1:2 * k:2] = values
        query_pos = 2 * k + 2 * gaps
        rows = np.arange(n)[:, None]
        inputs[rows, query_pos] = keys
        targets = np.full((n, t), IGNORE_INDEX, dtype=np.int64)
        targets[rows, query_pos] = values
        return make_batch(inputs, targets)
