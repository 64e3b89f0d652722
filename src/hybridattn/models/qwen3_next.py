"""Qwen3-Next checkpoints in the transformers format: read them into a ``HybridLM`` and write them back.

A transformers-format directory holds ``config.json`` (``"model_type": "qwen3_next"``) and ``model.safetensors``,
or shards ``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json``.

Config mapping (transformers -> ``ModelConfig``)::

    hidden_size, vocab_size, num_hidden_layers   -> d_model, vocab_size, num_layers
    layer_types | full_attention_interval         -> layers ("linear_attention" -> "gated_deltanet",
                                                     "full_attention" -> "attention")
    num_attention_heads, num_key_value_heads,     -> attention.num_heads, .num_kv_heads, .head_dim, .bias,
      head_dim, attention_bias                       with output_gate, qk_norm, RoPE
    rope_parameters | rope_theta, partial_rotary_factor, rope_scaling
                                                  -> attention.rope_theta, .partial_rotary_factor, .rope_scaling
                                                     (linear, dynamic, yarn, llama3, longrope)
    linear_num_key_heads, linear_num_value_heads, -> linear.num_heads, .num_v_heads, .head_dim, .v_head_dim,
      linear_key_head_dim, linear_value_head_dim,    .conv_size
      linear_conv_kernel_dim
    intermediate_size                             -> ffn (SwiGLU) of dense layers
    num_experts, num_experts_per_tok, moe_intermediate_size, shared_expert_intermediate_size,
      norm_topk_prob, decoder_sparse_step, mlp_only_layers, router_aux_loss_coef -> moe
    rms_norm_eps, tie_word_embeddings             -> norm_eps (zero-centred norms), tie_embeddings
    everything else (bos_token_id, dtype, ...)    -> source_fields, written back on export

The config mapping lives in ``models/qwen3_next_config.py`` (with the rules of the exact round trip).

Tensor mapping: hybridattn uses the transformers module names (``model.`` prefix dropped), except the MoE layer,
whose router is ``mlp.router`` (``mlp.gate`` there) and whose experts are stacked: ``mlp.gate_up_proj`` ``[E, 2I, d]``
holds ``experts.{e}.gate_proj`` then ``experts.{e}.up_proj``, ``mlp.down_proj`` ``[E, d, I]`` the
``experts.{e}.down_proj``. Checkpoints with transformers' own stacked ``mlp.experts.gate_up_proj`` are read too.
The fused ``in_proj_qkvz`` / ``in_proj_ba`` (grouped per key head), the depthwise conv over ``[q | k | v]``,
``A_log``, ``dt_bias`` and the zero-centred norms keep their transformers layouts, so they are copied as they are.
Multi-token-prediction weights (``mtp.*``) are not part of the model; they are skipped with a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch

from hybridattn.models.config import ModelConfig
from hybridattn.models.qwen3_next_config import MODEL_TYPE, config_from_transformers, config_to_transformers

__all__ = ["MODEL_TYPE", "config_from_transformers", "config_to_transformers", "detect", "load", "save",
           "read_safetensors", "state_dict_from_transformers", "state_dict_to_transformers"]
_INDEX = "model.safetensors.index.json"


def detect(config: Mapping) -> bool:
    """True for a transformers Qwen3-Next ``config.json`` dict (``"model_type": "qwen3_next"``)."""
    return config.get("model_type") == MODEL_TYPE


# -- tensors -----------------------------------------------------------------------------------------------------
_MOE_PARAM = re.compile(r"^(layers\.\d+\.mlp)\.(router\.weight|gate_up_proj|down_proj)$")


def _per_expert(prefix: str, part: str, tensor: torch.Tensor) -> dict:
    """Per-expert transformers names (``{prefix}.experts.{e}.*_proj.weight``) of a stacked ``gate_up_proj``
    ``[E, 2I, d]`` (gate rows first) or ``down_proj`` ``[E, d, I]``; the values are views."""
    if part == "down_proj":
        return {f"{prefix}.experts.{e}.down_proj.weight": tensor[e] for e in range(tensor.shape[0])}
    gate, up = tensor.chunk(2, dim=1)
    out = {}
    for e in range(tensor.shape[0]):
        out[f"{prefix}.experts.{e}.gate_proj.weight"], out[f"{prefix}.experts.{e}.up_proj.weight"] = gate[e], up[e]
    return out


def state_dict_to_transformers(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict:
    """transformers tensor names and layouts for a ``HybridLM`` state dict (experts unstacked, one per name).

    The tensors are views of the inputs (no copies), so exporting then importing is bit-exact.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            if not config.tie_embeddings:
                out[name] = tensor
            continue
        moe = _MOE_PARAM.match(name)
        if moe is None:
            out["model." + name] = tensor
        elif moe.group(2) == "router.weight":
            out[f"model.{moe.group(1)}.gate.weight"] = tensor
        else:
            out.update(_per_expert("model." + moe.group(1), moe.group(2), tensor))
    return out


def _unstack_transformers_experts(tensors: dict) -> dict:
    # transformers >= 5 may store the experts already stacked (`mlp.experts.gate_up_proj` [E, 2I, d], gate rows
    # first); split them into the per-expert names real checkpoints use, so one name check covers both layouts.
    out = {}
    for name, tensor in tensors.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp)\.experts\.(gate_up_proj|down_proj)$", name)
        if m is None:
            out[name] = tensor
        else:
            out.update(_per_expert(m.group(1), m.group(2), tensor))
    return out


def state_dict_from_transformers(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                                 config: ModelConfig) -> dict:
    """Map transformers tensors onto the names of ``expected`` (a ``HybridLM`` state dict, e.g. on the meta
    device), checking that every tensor is known, present and of the right shape.

    Raises:
        ValueError: unknown tensors, missing tensors or shape mismatches, each listed by its transformers name
            (shapes: expected vs received).
    """
    tensors = dict(tensors)
    skipped = sorted(n for n in tensors if n.startswith("mtp."))
    if skipped:
        warnings.warn(f"Qwen3-Next checkpoint: ignoring {len(skipped)} multi-token-prediction tensors (mtp.*, "
                      f"e.g. {skipped[0]}); hybridattn predicts one token at a time", stacklevel=3)
        for n in skipped:
            del tensors[n]
    tensors = _unstack_transformers_experts(tensors)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports write the tied matrix twice
    wanted = state_dict_to_transformers(expected, config)
    unknown = sorted(set(tensors) - set(wanted))
    missing = sorted(set(wanted) - set(tensors))
    if unknown or missing:
        parts = [f"{len(names)} {kind} tensor(s): {', '.join(names[:8])}" + (" ..." if len(names) > 8 else "")
                 for kind, names in (("unknown", unknown), ("missing", missing)) if names]
        raise ValueError("Qwen3-Next checkpoint does not match its config.json: " + "; ".join(parts))
    bad = [f"{n}: expected {tuple(wanted[n].shape)}, received {tuple(tensors[n].shape)}"
           for n in sorted(wanted) if tuple(wanted[n].shape) != tuple(tensors[n].shape)]
    if bad:
        raise ValueError("Qwen3-Next checkpoint tensor shapes do not match config.json: " + "; ".join(bad[:8]))
    from hybridattn.models.checkpoint import check_dtype

    for n in sorted(wanted):
        check_dtype(n, tensors[n], wanted[n], source="Qwen3-Next checkpoint")
    # Tensors are popped as they are used, so each layer's per-expert tensors can be freed once they are stacked
    # (the experts are nearly all of a real checkpoint's bytes; peak memory stays near one copy).
    out = {}
    for name in expected:
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        moe = _MOE_PARAM.match(name)
        if moe is None:
            out[name] = tensors.pop(name if name == "lm_head.weight" else "model." + name)
            continue
        prefix, part, n_exp = "model." + moe.group(1), moe.group(2), expected[name].shape[0]
        if part == "router.weight":
            out[name] = tensors.pop(f"{prefix}.gate.weight")
        elif part == "gate_up_proj":
            out[name] = torch.stack([torch.cat([tensors.pop(f"{prefix}.experts.{e}.gate_proj.weight"),
                                                tensors.pop(f"{prefix}.experts.{e}.up_proj.weight")])
                                     for e in range(n_exp)])
        else:
            out[name] = torch.stack([tensors.pop(f"{prefix}.experts.{e}.down_proj.weight") for e in range(n_exp)])
    return out


# -- files -------------------------------------------------------------------------------------------------------
def read_safetensors(directory, *, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``.

    Raises:
        FileNotFoundError: neither file exists, or a shard named by the index is absent.
    """
    from safetensors.torch import load_file

    tensors = {}
    for path in weight_files(directory):
        tensors.update(load_file(str(path), device=str(device)))
    return tensors


def weight_files(directory) -> list[Path]:
    """The safetensors files of a transformers directory: ``model.safetensors`` or the index's shards.

    Raises:
        FileNotFoundError: neither file exists, or a shard named by the index is absent.
    """
    directory = Path(directory)
    index = directory / _INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"directory: expected model.safetensors or {_INDEX} in {directory}, found neither")
    for name in files:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{_INDEX}: lists shard {name}, which is not in {directory}")
    return [directory / name for name in files]


def load(directory, *, dtype: torch.dtype | None = None, device=None, allow_edited_config: bool = False):
    """A ``HybridLM`` from a transformers-format Qwen3-Next directory (see the module docstring).

    Args:
        directory: holds ``config.json`` and the safetensors file(s).
        dtype: cast the weights to this dtype; None keeps the checkpoint's dtype.
        device: where to put the model; None = CPU.

    Raises:
        ValueError: unsupported config fields, unknown / missing / mis-shaped tensors (named).
    """
    from hybridattn.models.hybrid_lm import HybridLM

    from hybridattn.models.checkpoint import check_config_matches

    directory = Path(directory)
    config = config_from_transformers(json.loads((directory / "config.json").read_text()))
    with torch.device("meta"):
        skeleton = HybridLM(config)  # no memory and no random init: the checkpoint provides every tensor
    # passed on without keeping a reference, so the mapping can free tensors as it goes
    state = state_dict_from_transformers(read_safetensors(directory, device="cpu" if device is None else device),
                                         skeleton.state_dict(), config)
    check_config_matches(directory, weight_files(directory), allow_edited_config=allow_edited_config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if any(True for _ in skeleton.buffers()):
        # Buffers that are not in the checkpoint cannot be recovered from the meta skeleton: build for real.
        model = HybridLM(config).to(device=device, dtype=next(iter(state.values())).dtype)
        model.load_state_dict(state, strict=not config.tie_embeddings)
    else:
        model = skeleton
        model.load_state_dict(state, strict=not config.tie_embeddings, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def save(model, directory, *, max_shard_size: int = 5 * 2**30) -> None:
    """Write ``model`` as a transformers Qwen3-Next directory: ``config.json`` and ``model.safetensors``, or
    shards of at most ``max_shard_size`` bytes with ``model.safetensors.index.json``.

    Raises:
        ValueError: the model's config is not expressible as Qwen3-Next (see ``config_to_transformers``).
    """
    from safetensors.torch import save_file

    from hybridattn.models.checkpoint import weights_metadata

    directory = Path(directory)
    state = model.state_dict()
    dtype = next(iter(state.values())).dtype
    hf_config = config_to_transformers(model.config, dtype=dtype)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict_to_transformers(state, model.config).items()}
    directory.mkdir(parents=True, exist_ok=True)
    # sorted keys, as transformers writes them, so an imported config.json comes back to the letter
    config_text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    (directory / "config.json").write_text(config_text)
    metadata = weights_metadata(config_text)
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for stale in list(directory.glob("model*.safetensors")) + [directory / _INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n")
