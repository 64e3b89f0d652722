"""The mixer registry: every sequence mixer (softmax or linear) is built by name.

A *mixer* is a module following the mixer protocol (see ``docs/dev/CONTRACTS.md``)::

    forward(x, *, cache=None, token_mask=None) -> y        # x, y: [B, T, d_model]
    new_cache(batch_size, *, device=None, dtype=None) -> Cache

A *factory* builds one from ``(config, layer_idx)``, where ``config`` is a ``hybridattn.models.ModelConfig``.
Users register their own mixers the same way the built-in ones are registered::

    @register_mixer("my_mixer")
    def build_my_mixer(config, layer_idx):
        return MyMixer(config.d_model, **config.mixer_options.get("my_mixer", {}))

and then name them in a layer layout (``ModelConfig(layers=["my_mixer", "attention"])``).

Each entry carries three properties that the model side reads without building the mixer:

- ``softmax``: the mixer computes softmax attention over tokens (full, windowed, sparse or approximate), as
  opposed to a linear / recurrent mixer. It places the mixer in ``self_attn`` or ``linear_attn`` in checkpoints
  (the Qwen3-Next names) and counts it on the softmax side of a layout's ratio. It says nothing about memory:
  the memory planner reads the caches themselves (a sliding-window cache is fixed, DSA's grows).
- ``causal``: a position's output depends on that position and earlier ones only. A decoder-only ``HybridLM``
  refuses non-causal mixers (Linformer, LSH): trained with next-token loss they would see the future.
- ``options``: the keys the mixer accepts in ``config.mixer_options[name]``, so that ``ModelConfig`` rejects an
  unknown key when it is constructed (None: not declared, not checked).

This module must not import ``hybridattn.models`` (layers sit below models).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

MixerFactory = Callable[[object, int], nn.Module]


@dataclass(frozen=True)
class MixerEntry:
    name: str
    factory: MixerFactory
    #: softmax attention of some form (exact, windowed, sparse, approximate); False for linear / recurrent mixers
    softmax: bool
    #: the output at position t depends on positions <= t only (required in a decoder-only LM)
    causal: bool = True
    #: keys accepted in ``mixer_options[name]``; None = not declared
    options: tuple[str, ...] | None = None


_REGISTRY: dict[str, MixerEntry] = {}
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    # The built-in mixers register themselves on import; importing them lazily keeps `import hybridattn`
    # quick and avoids an import cycle (the mixer modules import this one).
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("hybridattn.layers.mixers")


def register_mixer(name: str, *, softmax: bool = False, causal: bool = True, options=None,
                   overwrite: bool = False):
    """Decorator registering ``factory(config, layer_idx) -> nn.Module`` under ``name``.

    Args:
        name: the name used in layer layouts (lower case, ``[a-z][a-z0-9_]*``).
        softmax: True for softmax attention of any form (full, windowed, sparse, approximate), False for
            linear / recurrent mixers. Sets the checkpoint layout (softmax mixers live in ``self_attn``, the
            others in ``linear_attn``, as in Qwen3-Next) and the side of a layout's ratio; not memory.
        causal: True when the output at position t depends on positions <= t only; ``HybridLM`` (decoder-only)
            refuses mixers registered with False.
        options: the keys accepted in ``config.mixer_options[name]`` (any iterable of str, e.g. a dict of
            defaults); ``ModelConfig`` rejects other keys. None = not declared (not checked).
        overwrite: allow replacing an existing entry (otherwise a duplicate name raises ``ValueError``).

    Raises:
        ValueError: ``name`` is malformed or already registered.
        TypeError: ``softmax`` / ``causal`` not bools, ``options`` not an iterable of str.
    """
    if not isinstance(name, str) or not name or not (name[0].isalpha() and name.islower()) or not all(
        c.isalnum() or c == "_" for c in name
    ):
        raise ValueError(f"name: expected a lower-case identifier such as 'my_mixer', received {name!r}")
    for flag, value in (("softmax", softmax), ("causal", causal)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}: expected a bool, received {type(value).__name__}")
    if options is not None:
        keys = () if isinstance(options, str) else tuple(options)  # a bare str would iterate its letters
        if isinstance(options, str) or not all(isinstance(key, str) for key in keys):
            raise TypeError(f"options: expected an iterable of str keys, received {options!r}")
        options = keys

    def decorator(factory: MixerFactory) -> MixerFactory:
        if name in _REGISTRY and not overwrite and _REGISTRY[name].factory is not factory:
            raise ValueError(f"name: mixer {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = MixerEntry(name, factory, softmax, causal, options)
        return factory

    return decorator


def available_mixers() -> list[str]:
    """Names of every registered mixer, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def mixer_entry(name: str) -> MixerEntry:
    """The registry entry of ``name``; raises ``ValueError`` listing the known names when missing."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"mixer: expected one of {tuple(sorted(_REGISTRY))}, received {name!r}")
    return _REGISTRY[name]


def is_softmax_mixer(name: str) -> bool:
    return mixer_entry(name).softmax


def is_causal_mixer(name: str) -> bool:
    return mixer_entry(name).causal


def build_mixer(name: str, config, layer_idx: int) -> nn.Module:
    """Build the mixer registered as ``name`` for layer ``layer_idx`` of ``config``."""
    return mixer_entry(name).factory(config, layer_idx)
