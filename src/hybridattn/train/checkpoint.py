"""Training checkpoints: safetensors + JSON, written atomically, enough to resume bit for bit.

Layout of a checkpoint directory::

    ckpt/latest.json              {"step": 300, "path": "step-00000300"}   (replaced atomically)
    ckpt/step-00000300/model.safetensors      model weights (tied weights stored once)
    ckpt/step-00000300/optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>"
    ckpt/step-00000300/rng.safetensors        torch CPU (and CUDA) generator states
    ckpt/step-00000300/trainer.json           step, schedule, optimizer param groups, history, config
    ckpt/step-00000300/config.json            the model's ModelConfig (HybridLM): the step loads with from_pretrained

    ckpt/step-00000300/manifest.json          size and SHA-256 of each file above (written last)

Nothing is pickled and nothing is loaded with ``torch.load``: a checkpoint holds tensors and JSON only.
A checkpoint is first written to a temporary directory, flushed to disk, renamed into place, and only then
does ``latest.json`` (itself written to a temporary file and ``os.replace``-d) point at it. A process killed
at any moment leaves either the previous checkpoint or the new one, never a half-written one.

Loading verifies a step directory against its manifest before reading it. When ``latest.json`` is missing,
unreadable or points at a directory that does not verify (a disk that lost data, a copy cut short), the newest
step directory that verifies is loaded instead, with a warning naming it and saying why. Cleanup after a save
removes only step directories older than the new one, so the checkpoint ``latest.json`` points at and those of
another run with higher step numbers are never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

LATEST = "latest.json"
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json")
MODEL_CONFIG = "config.json"  # written beside the weights when the model has a ModelConfig (optional)
_STEP_DIR = re.compile(r"step-(\d+)$")


class CheckpointError(ValueError):
    """A step directory that does not verify against its manifest (the message says which file and how)."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` directory, newest (highest step) first."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, key=lambda item: item[0], reverse=True)


def save_checkpoint(directory: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, state: dict, keep: int = 2) -> Path:
    """Write a checkpoint of ``step`` into ``directory`` atomically and point ``latest.json`` at it.

    Args:
        directory: the checkpoint directory (created if missing).
        model: the (unwrapped) model.
        optimizer: its optimizer.
        step: number of optimizer steps completed; also the data position.
        state: JSON-able trainer state (schedule, history, config).
        keep: how many step directories up to this one to keep: this one and the ``keep - 1`` newest older ones;
            older ones are deleted after the pointer moved. Directories with a higher step (another run's) are
            left alone.

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
    files = list(FILES)
    config = getattr(model, "config", None)
    if hasattr(config, "to_json"):  # a HybridLM: the step directory also loads with from_pretrained
        (tmp / MODEL_CONFIG).write_text(config.to_json() + "\n")
        _fsync_file(tmp / MODEL_CONFIG)
        files.append(MODEL_CONFIG)
    _write_json(tmp / MANIFEST, {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files})
    _fsync_dir(tmp)
    final = directory / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = directory / (LATEST + ".tmp")
    _write_json(pointer_tmp, {"step": step, "path": name})
    os.replace(pointer_tmp, directory / LATEST)
    _fsync_dir(directory)
    older = [path for s, path in _step_dirs(directory) if s < step]
    for old in older[max(0, keep - 1):]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a step directory against its ``manifest.json`` (every file present, of the recorded size and SHA-256)
    and return its ``trainer.json``.

    Raises:
        CheckpointError: naming the file that is missing, cut short, altered or unreadable.
    """
    path = Path(path)
    if not (path / MANIFEST).exists() and all((path / f).is_file() for f in FILES):
        return _verify_by_parsing(path)  # written before checkpoints carried a manifest
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: {MANIFEST} is missing or unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict) or not set(FILES) <= set(manifest) <= {*FILES, MODEL_CONFIG}:
        raise CheckpointError(f"{path}: {MANIFEST} does not list the files {FILES}")
    for name, entry in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"{path}: {name} has {size} bytes, the manifest records {entry.get('bytes')}")
        if _sha256(f) != entry.get("sha256"):
            raise CheckpointError(f"{path}: {name} does not match the SHA-256 its manifest records")
    try:
        return json.loads((path / "trainer.json").read_text())
    except ValueError as err:  # verified bytes that are not JSON: written so by another program
        raise CheckpointError(f"{path}: trainer.json is not JSON ({err})") from None


def _verify_by_parsing(path: Path) -> dict:
    """A step directory without a manifest: every tensor file must parse whole and trainer.json be JSON."""
    from safetensors import SafetensorError

    for name in FILES[:3]:
        try:
            load_file(str(path / name))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: {name} is unreadable ({type(err).__name__}: {err})") from None
    try:
        return json.loads((path / "trainer.json").read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: trainer.json is not JSON ({err})") from None


def find_checkpoint(directory: str | os.PathLike) -> tuple[Path, dict] | None:
    """The step directory to resume from and its trainer state: the one ``latest.json`` points at when it
    verifies, else the newest that does (warning which one and why); None when ``directory`` holds none.

    Raises:
        CheckpointError: step directories exist but none verifies (each one's reason in the message).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [path for _, path in _step_dirs(directory)]
    problems = []
    pointer = directory / LATEST
    if pointer.exists():
        try:
            target = directory / json.loads(pointer.read_text())["path"]
            candidates = [target] + [c for c in candidates if c != target]
        except (OSError, ValueError, KeyError, TypeError) as err:
            problems.append(f"{LATEST} is unreadable ({type(err).__name__}: {err})")
    elif candidates:
        problems.append(f"{LATEST} is missing")
    for path in candidates:
        try:
            state = verify_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            warnings.warn(f"checkpoint: resuming from {path.name}: " + "; ".join(problems), RuntimeWarning,
                          stacklevel=3)
        return path, state
    if problems and candidates:
        raise CheckpointError(f"checkpoint: no step directory in {directory} verifies: " + "; ".join(problems))
    return None


def load_checkpoint(directory: str | os.PathLike, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True,
                    check_state=None) -> dict | None:
    """Load the checkpoint of :func:`find_checkpoint` into ``model`` (and ``optimizer``, RNG states).

    Args:
        check_state: called with the trainer state before anything is loaded (e.g. to refuse another run's
            settings); it raises to stop.

    Returns:
        The trainer state (``trainer.json``, with ``step`` and ``path``), or None when ``directory`` has no
        checkpoint.

    Raises:
        ValueError: the checkpoint's tensors do not fit ``model`` (names and shapes in the message).
        CheckpointError: no step directory verifies.
    """
    found = find_checkpoint(directory)
    if found is None:
        return None
    path, state = found
    if check_state is not None:
        check_state(state)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint: tensors do not match the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    if optimizer is not None:
        optimizer_from_flat(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    if restore_rng:
        _set_rng(load_file(str(path / "rng.safetensors")))
    return {**state, "path": str(path)}
