"""What every task shares: the batch it returns, seeded generators and the task registry.

A task is a deterministic generator: the same ``(seed, split)`` always gives the same examples, on any
machine. Training draws batch ``i`` with seed ``(run seed, i)``, so the data position of a run is just its
step count: a resumed run sees exactly the batches an uninterrupted one would.

Shape legend: N examples, T sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from hybridattn.ops._checks import check_choice, check_positive_int

#: target value at positions that are not scored (PyTorch's ``cross_entropy`` ignore index)
IGNORE_INDEX = -100
SPLITS = ("train", "eval")


@dataclass
class TaskBatch:
    """Inputs, next-token targets and the mask of scored positions.

    Attributes:
        inputs: int64 ``[N, T]`` token ids fed to the model.
        targets: int64 ``[N, T]``; ``targets[n, t]`` is the token the model must predict after reading
            ``inputs[n, : t + 1]``, or ``IGNORE_INDEX`` where nothing is scored.
        mask: bool ``[N, T]``, True at scored positions (exactly where ``targets != IGNORE_INDEX``).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def slice(self, start: int, stop: int) -> "TaskBatch":
        return TaskBatch(self.inputs[start:stop], self.targets[start:stop], self.mask[start:stop])

    def to(self, device) -> "TaskBatch":
        return TaskBatch(self.inputs.to(device), self.targets.to(device), self.mask.to(device))


def make_batch(inputs: np.ndarray, targets: np.ndarray) -> TaskBatch:
    """Wrap numpy ``inputs``/``targets`` (``IGNORE_INDEX`` where unscored) into a :class:`TaskBatch`."""
    inputs_t = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64))
    targets_t = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64))
    return TaskBatch(inputs_t, targets_t, targets_t != IGNORE_INDEX)


def rng_for(seed: int, split: str, *stream: int) -> np.random.Generator:
    """A numpy generator for ``(seed, split, *stream)``; train and eval streams never overlap."""
    check_positive_int("seed", seed, allow_zero=True)
    check_choice("split", split, SPLITS)
    return np.random.default_rng([seed, SPLITS.index(split), *stream])


def sample_without_replacement(rng: np.random.Generator, n: int, population: int, k: int,
                               log_weights: np.ndarray | None = None) -> np.ndarray:
    """``[n, k]`` distinct indices from ``range(population)`` per row, optionally weighted.

    Weighted sampling uses the Gumbel-top-k trick, which draws the same distribution as picking one index
    at a time with probability proportional to its weight among those left (numpy's ``choice`` with
    ``replace=False, p=...``), but for all rows at once.
    """
    if k > population:
        raise ValueError(f"k: expected at most population={population} distinct draws, received {k}")
    scores = rng.gumbel(size=(n, population))
    if log_weights is not None:
        scores = scores + log_weights[None, :]
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


class Task(Protocol):
    """What the trainer and the arena need from a task."""

    name: str
    vocab_size: int
    seq_len: int

    def sample(self, num_examples: int, *, seed: int, split: str = "train") -> TaskBatch: ...


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    """Decorator: ``@register_task("mqar")`` on a task class (or factory) makes ``build_task("mqar", ...)``
    construct it."""

    def decorate(factory):
        if name in TASKS:
            raise ValueError(f"name: task {name!r} is already registered")
        TASKS[name] = factory
        return factory

    return decorate


def build_task(name: str, **options) -> Task:
    """Construct the registered task ``name`` with keyword ``options`` (its dataclass fields)."""
    check_choice("task", name, sorted(TASKS))
    return TASKS[name](**options)


def check_len(name: str, value: int, minimum: int) -> int:
    check_positive_int(name, value)
    if value < minimum:
        raise ValueError(f"{name}: expected at least {minimum}, received {value}")
    return value
