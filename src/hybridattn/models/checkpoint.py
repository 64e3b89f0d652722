"""Checkpoints of ``HybridLM``: a directory with ``config.json`` and ``model.safetensors`` (never pickle).

    model.save_pretrained("ckpt/")
    model = HybridLM.from_pretrained("ckpt/")

Both files are written to temporary names in the target directory and renamed into place, so a crash never
leaves a half-written checkpoint under the real names. Loading checks every tensor against the model the
config builds and fails naming the first tensor that is missing, unexpected, or of another shape.

Other on-disk formats plug in through ``FORMATS`` (e.g. the transformers layout of Qwen3-Next): a format
registers ``save(model, directory)``, ``load(directory, **kwargs) -> HybridLM`` and ``detect(config_dict) ->
bool``; ``from_pretrained`` picks the first format whose ``detect`` accepts the directory's ``config.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
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


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _weights_to_save(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
    # safetensors writes from host memory; the copy also unties views that share storage
    return {name: t.detach().cpu().contiguous() for name, t in state.items()}


def _save_native(model, directory: Path) -> None:
    from safetensors.torch import save_file

    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(_weights_to_save(model), tmp,
                                                                   metadata={"format": "pt"}))
    # config last: a directory with a config.json always has the matching weights beside it
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(model.config.to_json() + "\n"))


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], *, source: str) -> None:
    """Raise ``ValueError`` naming the first tensor that is missing from ``found``, unexpected in it, or of
    another shape than in ``expected``."""
    for name, ref in expected.items():
        if name not in found:
            raise ValueError(f"{source}: tensor {name!r} (shape {tuple(ref.shape)}) is missing from the checkpoint")
        if tuple(found[name].shape) != tuple(ref.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(found[name].shape)} in the checkpoint but "
                             f"the config expects {tuple(ref.shape)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: tensor {unexpected[0]!r} in the checkpoint is not a parameter of the model the "
                         f"config builds ({len(unexpected)} unexpected tensors)")


def _load_native(directory: Path, *, device=None, dtype=None):
    from safetensors.torch import load_file

    from hybridattn.models.config import ModelConfig
    from hybridattn.models.hybrid_lm import HybridLM

    config = ModelConfig.from_json(directory / CONFIG_NAME)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.exists():
        raise FileNotFoundError(f"directory: expected {WEIGHTS_NAME} beside {CONFIG_NAME} in {directory}")
    found = load_file(str(weights_path))
    model = HybridLM(config)
    expected = _weights_to_save(model)
    check_state_dict(expected, found, source=str(weights_path))
    model.load_state_dict(found, strict=not config.tie_embeddings)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model


FORMATS["hybridattn"] = CheckpointFormat(save=_save_native, load=_load_native, detect=lambda cfg: "d_model" in cfg)


def save_pretrained(model, directory, *, format: str = "hybridattn") -> None:
    """Write ``model`` to ``directory`` (created when missing) in ``format`` (``"hybridattn"``: config.json +
    model.safetensors).

    Raises:
        ValueError: an unknown format.
    """
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {tuple(FORMATS)}, received {format!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    FORMATS[format].save(model, directory)


def from_pretrained(directory, *, format: str | None = None, device=None, dtype=None):
    """Load a ``HybridLM`` from ``directory``; ``format`` None = detected from ``config.json``.

    Args:
        directory: a directory written by :func:`save_pretrained` (or another registered format).
        format: force a format by name.
        device, dtype: move/cast the loaded model.

    Raises:
        FileNotFoundError: no ``config.json`` / weights.
        ValueError: an unknown format, or config and tensors that disagree (naming the tensor and both shapes).
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(f"directory: expected {CONFIG_NAME} in {directory}")
    if format is None:
        config = json.loads(config_path.read_text())
        format = next((name for name, f in FORMATS.items() if f.detect(config)), None)
        if format is None:
            raise ValueError(f"directory: {config_path} matches none of the known formats {tuple(FORMATS)}")
    elif format not in FORMATS:
        raise ValueError(f"format: expected one of {tuple(FORMATS)}, received {format!r}")
    return FORMATS[format].load(directory, device=device, dtype=dtype)


# Qwen3-Next in the transformers layout; the mapping lives in its own module (which does not import this one).
from hybridattn.models import qwen3_next as _qwen3_next  # noqa: E402

FORMATS["transformers"] = CheckpointFormat(save=_qwen3_next.save, load=_qwen3_next.load, detect=_qwen3_next.detect)
