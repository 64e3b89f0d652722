"""Checkpoints of ``HybridLM``: a directory with ``config.json`` and ``model.safetensors`` (never pickle).

    model.save_pretrained("ckpt/")
    model = HybridLM.from_pretrained("ckpt/")

A save writes the whole directory anew beside the target (``.<name>.tmp-*``), flushes it to disk and swaps it in
with one atomic exchange (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames whose window leaves the
old directory intact under ``.<name>.old-*``), so a kill at any moment leaves the previous save or the new one,
never new weights beside an old config. Files the save does not write (a tokenizer, a README) are carried over.
Every weights file records the SHA-256 of the ``config.json`` written with it, and loading refuses a pair from two
saves (``allow_edited_config=True`` accepts a config edited by hand). Loading checks every tensor against the model
the config builds and fails naming the first tensor that is missing, unexpected, of another shape, or of a
non-floating dtype where the model has a floating one.

Other on-disk formats plug in through ``FORMATS`` (e.g. the transformers layout of Qwen3-Next): a format
registers ``save(model, directory)`` (into a new, empty directory), ``load(directory, **kwargs) -> HybridLM`` and
``detect(config_dict) -> bool``; ``from_pretrained`` picks the first format whose ``detect`` accepts the directory's
``config.json``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class CheckpointFormat:
    save: Callable
    load: Callable
    detect: Callable[[dict], bool]


FORMATS: dict[str, CheckpointFormat] = {}


CONFIG_HASH_KEY = "hybridattn_config_sha256"  # safetensors metadata: the config.json written with the weights


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def weights_metadata(config_text: str) -> dict[str, str]:
    """The safetensors metadata every format writes: ties the weights to the ``config.json`` text saved with them."""
    return {"format": "pt", CONFIG_HASH_KEY: config_digest(config_text)}


def check_config_matches(directory: Path, weight_files, *, allow_edited_config: bool = False) -> None:
    """Refuse ``config.json`` beside weights written with another one (two saves mixed). Weights without the
    record (written by other tools) pass."""
    from safetensors import safe_open

    if allow_edited_config:
        return
    have = config_digest((directory / CONFIG_NAME).read_text())
    for f in weight_files:
        with safe_open(str(f), "pt") as handle:
            want = (handle.metadata() or {}).get(CONFIG_HASH_KEY)
        if want is not None and want != have:
            raise ValueError(f"directory: {directory / CONFIG_NAME} is not the config saved with {f.name} (two saves "
                             f"mixed, or the config was edited); load with allow_edited_config=True if it was "
                             f"edited on purpose")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_text_atomic(path, text: str) -> None:
    """Replace the file ``path`` with ``text`` as one unit: written beside it, flushed, renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _is_format_file(name: str) -> bool:
    return name == CONFIG_NAME or (name.startswith("model") and (name.endswith(".safetensors")
                                                                  or name.endswith(".safetensors.index.json")))


def replace_directory(directory, write: Callable[[Path], None]) -> None:
    """Write a new ``directory`` with ``write(tmp)`` and swap it in as one unit (see the module docstring)."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"directory: expected a directory (or a new path), received the file {directory}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        if directory.is_dir():  # carry over what this save does not write (tokenizer files, notes)
            for entry in directory.iterdir():
                if (tmp / entry.name).exists() or _is_format_file(entry.name):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    try:
                        os.link(entry, tmp / entry.name)
                    except OSError:
                        shutil.copy2(entry, tmp / entry.name)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                _fsync(f)
        _fsync(tmp)
        if not directory.exists():
            os.rename(tmp, directory)
        elif _exchange(tmp, directory):
            shutil.rmtree(tmp)  # tmp now holds the old contents
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rename(directory, old / "d")
            os.rename(tmp, directory)
            shutil.rmtree(old)
        _fsync(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _weights_to_save(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
    # safetensors writes from host memory; the copy also unties views that share storage
    return {name: t.detach().cpu().contiguous() for name, t in state.items()}


def _save_native(model, directory: Path) -> None:
    from safetensors.torch import save_file

    config_text = model.config.to_json() + "\n"
    save_file(_weights_to_save(model), str(directory / WEIGHTS_NAME), metadata=weights_metadata(config_text))
    (directory / CONFIG_NAME).write_text(config_text)


def check_dtype(name: str, found: torch.Tensor, ref: torch.Tensor, *, source: str) -> None:
    """A floating parameter must come from a floating tensor (an integer one would be truncated or reinterpreted)."""
    if ref.is_floating_point() != found.is_floating_point() or found.is_complex() != ref.is_complex():
        raise ValueError(f"{source}: tensor {name!r} has dtype {found.dtype} in the checkpoint but the model expects "
                         f"{ref.dtype}")


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], *, source: str) -> None:
    """Raise ``ValueError`` naming the first tensor that is missing from ``found``, unexpected in it, of another
    shape than in ``expected``, or of a non-floating dtype where ``expected`` is floating (and vice versa)."""
    for name, ref in expected.items():
        if name not in found:
            raise ValueError(f"{source}: tensor {name!r} (shape {tuple(ref.shape)}) is missing from the checkpoint")
        if tuple(found[name].shape) != tuple(ref.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(found[name].shape)} in the checkpoint but "
                             f"the config expects {tuple(ref.shape)}")
        check_dtype(name, found[name], ref, source=source)
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: tensor {unexpected[0]!r} in the checkpoint is not a parameter of the model the "
                         f"config builds ({len(unexpected)} unexpected tensors)")


def _load_native(directory: Path, *, device=None, dtype=None, allow_edited_config: bool = False):
    from safetensors.torch import load_file

    from hybridattn.models.config import ModelConfig
    from hybridattn.models.hybrid_lm import HybridLM

    config = ModelConfig.from_json(directory / CONFIG_NAME)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.exists():
        raise FileNotFoundError(f"directory: expected {WEIGHTS_NAME} beside {CONFIG_NAME} in {directory}")
    found = load_file(str(weights_path))
    if config.tie_embeddings:  # one matrix under two names: a training checkpoint may have kept either
        tied = found.pop("lm_head.weight", None)
        if "embed_tokens.weight" not in found and tied is not None:
            found["embed_tokens.weight"] = tied
    model = HybridLM(config)
    expected = _weights_to_save(model)
    check_state_dict(expected, found, source=str(weights_path))
    # after the tensor checks: a config whose shapes disagree gets the more telling error above
    check_config_matches(directory, [weights_path], allow_edited_config=allow_edited_config)
    model.load_state_dict(found, strict=not config.tie_embeddings)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model


FORMATS["hybridattn"] = CheckpointFormat(save=_save_native, load=_load_native, detect=lambda cfg: "d_model" in cfg)


def resolve_model_directory(directory) -> Path:
    """The directory holding a model: ``directory`` itself when it has a ``config.json``; for a training
    checkpoint directory, its ``final/`` model (what the training CLI saves at the end) or else the newest
    step that verifies, with a warning saying which.

    Raises:
        FileNotFoundError: none of these, with what was looked for.
    """
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        return directory
    if (directory / "final" / CONFIG_NAME).is_file():
        warnings.warn(f"{directory} is a training checkpoint directory: loading its final model, {directory / 'final'}",
                      UserWarning, stacklevel=3)
        return directory / "final"
    if (directory / "latest.json").exists() or any(directory.glob("step-*")):
        from hybridattn.train.checkpoint import find_checkpoint

        found = find_checkpoint(directory)
        if found is not None and (found[0] / CONFIG_NAME).is_file():
            warnings.warn(f"{directory} is a training checkpoint directory without a final model: loading its "
                          f"newest checkpoint, {found[0].name} (step {found[1].get('step')})", UserWarning,
                          stacklevel=3)
            return found[0]
    raise FileNotFoundError(f"directory: expected {CONFIG_NAME} in {directory} (a saved model), or a training "
                            f"checkpoint directory with final/ or step-* checkpoints written by this version")


def read_config_json(path: Path) -> dict:
    """The JSON object of a ``config.json``.

    Raises:
        ValueError: the file is empty or not JSON; TypeError: it holds no JSON object (each naming the file).
    """
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: expected a JSON object, the file is not JSON ({err})") from None
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a JSON object, received {type(data).__name__}")
    return data


def save_pretrained(model, directory, *, format: str = "hybridattn") -> None:
    """Write ``model`` to ``directory`` (created when missing) in ``format`` (``"hybridattn"``: config.json +
    model.safetensors).

    Raises:
        ValueError: an unknown format.
    """
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {tuple(FORMATS)}, received {format!r}")
    replace_directory(directory, lambda tmp: FORMATS[format].save(model, tmp))


def from_pretrained(directory, *, format: str | None = None, device=None, dtype=None, allow_edited_config=False):
    """Load a ``HybridLM`` from ``directory``; ``format`` None = detected from ``config.json``.

    Args:
        directory: a directory written by :func:`save_pretrained` (or another registered format).
        format: force a format by name.
        device, dtype: move/cast the loaded model.
        allow_edited_config: accept a ``config.json`` that is not the one saved with the weights (edited by hand).

    Raises:
        FileNotFoundError: no ``config.json`` / weights.
        ValueError: an unknown format, or config and tensors that disagree (naming the tensor and both shapes).
    """
    directory = resolve_model_directory(directory)
    config_path = directory / CONFIG_NAME
    if format is None:
        config = read_config_json(config_path)
        format = next((name for name, f in FORMATS.items() if f.detect(config)), None)
        if format is None:
            raise ValueError(f"directory: {config_path} matches none of the known formats {tuple(FORMATS)}")
    elif format not in FORMATS:
        raise ValueError(f"format: expected one of {tuple(FORMATS)}, received {format!r}")
    return FORMATS[format].load(directory, device=device, dtype=dtype, allow_edited_config=allow_edited_config)


# Qwen3-Next in the transformers layout; the mapping lives in its own module (which does not import this one).
from hybridattn.models import qwen3_next as _qwen3_next  # noqa: E402

FORMATS["transformers"] = CheckpointFormat(save=_qwen3_next.save, load=_qwen3_next.load, detect=_qwen3_next.detect)
