"""Training checkpoints: safetensors + JSON, written atomically, enough to resume bit for bit.

Layout of a checkpoint directory::

    ckpt/latest.json              {"step": 300, "path": "step-00000300"}   (replaced atomically)
    ckpt/step-00000300/model.safetensors      model weights (tied weights stored once)
    ckpt/step-00000300/optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>"
    ckpt/step-00000300/rng.safetensors        torch CPU (and CUDA) generator states
    ckpt/step-00000300/trainer.json           step, schedule, optimizer param groups, history, config

Nothing is pickled and nothing is loaded with ``torch.load``: a checkpoint holds tensors and JSON only.
A checkpoint is first written to a temporary directory, flushed to disk, renamed into place, and only then
does ``latest.json`` (itself written to a temporary file and ``os.replace``-d) point at it. A process killed
at any moment leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

LATEST = "latest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able metadata."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_to_flat`: load the state into ``optimizer``."""
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(meta["param_groups"]):
        raise ValueError(f"optimizer: expected {len(current)} parameter groups, checkpoint has "
                         f"{len(meta['param_groups'])}")
    groups = []
    for cur, saved in zip(current, meta["param_groups"]):
        # JSON turned tuples (betas) into lists; give them back their type
        groups.append({k: (tuple(v) if isinstance(cur.get(k), tuple) else v) for k, v in saved.items()})
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def _set_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def save_checkpoint(directory: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, state: dict, keep: int = 2) -> Path:
    """Write a checkpoint of ``step`` into ``directory`` atomically and point ``latest.json`` at it.

    Args:
        directory: the checkpoint directory (created if missing).
        model: the (unwrapped) model.
        optimizer: its optimizer.
        step: number of optimizer steps completed; also the data position.
        state: JSON-able trainer state (schedule, history, config).
        keep: how many step directories to keep (older ones are deleted after the pointer moved).

    Returns:
        The path of the new step directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=directory))
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
    for f in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        _fsync_file(tmp / f)
    _write_json(tmp / "trainer.json", {"step": step, "optimizer": opt_meta, **state})
    _fsync_dir(tmp)
    final = directory / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = directory / (LATEST + ".tmp")
    _write_json(pointer_tmp, {"step": step, "path": name})
    os.replace(pointer_tmp, directory / LATEST)
    _fsync_dir(directory)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(directory: str | os.PathLike, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True) -> dict | None:
    """Load the checkpoint ``latest.json`` points at into ``model`` (and ``optimizer``, RNG states).

    Returns:
        The trainer state (``trainer.json``, with ``step``), or None when ``directory`` has no checkpoint.

    Raises:
        ValueError: the checkpoint's tensors do not fit ``model`` (names and shapes in the message).
    """
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    path = directory / json.loads(pointer.read_text())["path"]
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint: tensors do not match the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    state = json.loads((path / "trainer.json").read_text())
    if optimizer is not None:
        optimizer_from_flat(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    if restore_rng:
        _set_rng(load_file(str(path / "rng.safetensors")))
    return state
