"""Synthetic and real-text tasks for training and comparing sequence models.

Every task is a seeded, deterministic generator: ``task.sample(n, seed=s, split="train"|"eval")`` returns a
:class:`TaskBatch` of ``inputs``, next-token ``targets`` and the ``mask`` of scored positions. Tasks are
found by name through the registry: ``build_task("mqar", num_kv_pairs=32)``.
"""

from hybridattn.tasks.base import IGNORE_INDEX, TASKS, Task, TaskBatch, build_task, register_task
from hybridattn.tasks.copying import Copying, SelectiveCopying
from hybridattn.tasks.induction import Induction
from hybridattn.tasks.mqar import MQAR
from hybridattn.tasks.passkey import Passkey
from hybridattn.tasks.text import TextLM, bits_per_byte

__all__ = [
    "IGNORE_INDEX", "TASKS", "Task", "TaskBatch", "build_task", "register_task",
    "MQAR", "Copying", "SelectiveCopying", "Induction", "Passkey", "TextLM", "bits_per_byte",
]
