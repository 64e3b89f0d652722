"""Byte-level language modelling on real text, scored in bits per byte on held-out text.

The default corpus needs no download: the ``.py`` sources of the running Python's standard library, found
through ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded, since it differs per machine).
Files are taken in sorted order of their path relative to the root, and a file belongs to the held-out
split when ``crc32(relative path) % 10 == 0`` — a choice that does not depend on the file list, so adding a
file never moves another between splits. ``data=PATH`` uses a user's text: every file under a directory,
split the same way (a directory of so few files that one split would stay empty has its bytes split instead,
the last 10% held out), or a single file whose last 10% is held out. Each split is capped at ``max_bytes``
(held-out at a tenth of it), filled in file order.

Every position is scored (next byte). Training windows start at random offsets of the training bytes;
evaluation windows at random offsets of the held-out bytes, from a seed of their own. Bits per byte is the
mean cross-entropy in nats divided by ``ln 2`` (:func:`bits_per_byte`); one token is one byte.

The standard library differs between Python versions, so numbers are comparable within one version.
"""

from __future__ import annotations

import math
import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from hybridattn.tasks.base import TaskBatch, check_len, make_batch, register_task, rng_for

HELD_OUT_EVERY = 10
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def bits_per_byte(loss_nats: float) -> float:
    """Convert a mean next-byte cross-entropy (nats) to bits per byte."""
    return loss_nats / math.log(2)


def _files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]   # prune: site-packages can be huge
        files += [Path(dirpath, f) for f in filenames if suffixes is None or Path(f).suffix in suffixes]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _concat(paths: list[Path], limit: int) -> bytes:
    chunks, size = [], 0
    for p in paths:
        if size >= limit:
            break
        data = p.read_bytes()
        chunks.append(data[: limit - size])
        size += len(chunks[-1])
    return b"".join(chunks)


@lru_cache(maxsize=4)
def load_corpus(data: str | None = None, max_bytes: int = 4_000_000) -> tuple[bytes, bytes]:
    """``(train_bytes, held_out_bytes)`` of the stdlib corpus (``data=None``) or of ``data``.

    Raises:
        ValueError: ``data`` does not exist or holds no text.
    """
    if data is None:
        root, suffixes = Path(sysconfig.get_paths()["stdlib"]), (".py",)
    else:
        root, suffixes = Path(data), None
        if not root.exists():
            raise ValueError(f"data: expected an existing file or directory, received {data!r}")
    if root.is_file():
        raw = root.read_bytes()
        cut = len(raw) - len(raw) // HELD_OUT_EVERY
        train, held = raw[:cut][:max_bytes], raw[cut:][: max_bytes // HELD_OUT_EVERY]
    else:
        files = _files(root, suffixes)
        is_held = [zlib.crc32(p.relative_to(root).as_posix().encode()) % HELD_OUT_EVERY == 0 for p in files]
        train = _concat([p for p, h in zip(files, is_held) if not h], max_bytes)
        held = _concat([p for p, h in zip(files, is_held) if h], max_bytes // HELD_OUT_EVERY)
        if files and (not train or not held):
            # too few files for the path-hash split to put some in each: split their bytes like one file's
            raw = _concat(files, max_bytes + max_bytes // HELD_OUT_EVERY)
            cut = len(raw) - len(raw) // HELD_OUT_EVERY
            train, held = raw[:cut][:max_bytes], raw[cut:][: max_bytes // HELD_OUT_EVERY]
    if not train or not held:
        raise ValueError(f"data: expected text in both splits, received {len(train)} training and "
                         f"{len(held)} held-out bytes from {str(root)!r}")
    return train, held


@register_task("text")
@dataclass
class TextLM:
    """Byte-level language modelling.

    Args:
        seq_len: T bytes per window.
        data: a text file or a directory of text files; None for the standard library's sources.
        max_bytes: cap on the training bytes read (held-out: a tenth).
        vocab_size: fixed at 256 (bytes).
    """

    seq_len: int = 256
    data: str | None = None
    max_bytes: int = 4_000_000
    vocab_size: int = 256
    name: str = "text"
    _splits: tuple = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_len("seq_len", self.seq_len, 1)
        check_len("max_bytes", self.max_bytes, HELD_OUT_EVERY)
        if self.vocab_size != 256:
            raise ValueError(f"vocab_size: expected 256 (byte-level), received {self.vocab_size}")

    def split_bytes(self, split: str) -> np.ndarray:
        """The bytes of ``split`` ("train" or "eval") as a uint8 array (loaded on first use)."""
        if self._splits is None:
            train, held = load_corpus(self.data, self.max_bytes)
            for name, raw in (("training", train), ("held-out", held)):
                if len(raw) < self.seq_len + 1:
                    raise ValueError(f"seq_len: expected at most {len(raw) - 1} (the {name} text has "
                                     f"{len(raw)} bytes), received {self.seq_len}")
            self._splits = (np.frombuffer(train, dtype=np.uint8), np.frombuffer(held, dtype=np.uint8))
        return self._splits[0 if split == "train" else 1]

    def sample(self, num_examples: int, *, seed: int, split: str = "train") -> TaskBatch:
        """``num_examples`` windows of ``split`` for ``seed``; ``[N, T]`` inputs/targets/mask (all scored)."""
        rng = rng_for(seed, split)
        raw = self.split_bytes(split)
        starts = rng.integers(0, len(raw) - self.seq_len, size=num_examples)
        windows = raw[starts[:, None] + np.arange(self.seq_len + 1)[None, :]].astype(np.int64)
        return make_batch(windows[:, :-1], windows[:, 1:])
