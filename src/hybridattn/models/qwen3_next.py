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
                                                  -> attention.rope_theta, .partial_rotary_factor (default RoPE)
    linear_num_key_heads, linear_num_value_heads, -> linear.num_heads, .num_v_heads, .head_dim, .v_head_dim,
      linear_key_head_dim, linear_value_head_dim,    .conv_size
      linear_conv_kernel_dim
    intermediate_size                             -> ffn (SwiGLU) of dense layers
    num_experts, num_experts_per_tok, moe_intermediate_size, shared_expert_intermediate_size,
      norm_topk_prob, decoder_sparse_step, mlp_only_layers, router_aux_loss_coef -> moe
    rms_norm_eps, tie_word_embeddings             -> norm_eps (zero-centred norms), tie_embeddings

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

MODEL_TYPE = "qwen3_next"
_LAYER_TYPES = {"linear_attention": "gated_deltanet", "full_attention": "attention"}
_INDEX = "model.safetensors.index.json"


def detect(config: Mapping) -> bool:
    """True for a transformers Qwen3-Next ``config.json`` dict (``"model_type": "qwen3_next"``)."""
    return config.get("model_type") == MODEL_TYPE


# -- config ------------------------------------------------------------------------------------------------------
def config_from_transformers(hf: Mapping) -> ModelConfig:
    """A ``ModelConfig`` from a transformers ``Qwen3NextConfig`` dict (``config.json``).

    Raises:
        ValueError: ``model_type`` is not ``qwen3_next``, or a field asks for something hybridattn does not run
            (an activation other than SiLU, a RoPE type other than the default, an unknown layer type); the message
            names the field.
    """
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"config.json model_type: expected {MODEL_TYPE!r}, received {hf.get('model_type')!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act: expected 'silu', received {hf['hidden_act']!r}")
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        interval = hf.get("full_attention_interval", 4)
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    for i, kind in enumerate(layer_types):
        if kind not in _LAYER_TYPES:
            raise ValueError(f"config.json layer_types[{i}]: expected one of {tuple(_LAYER_TYPES)}, received {kind!r}")
    rope = dict(hf.get("rope_parameters") or {})
    legacy_scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", legacy_scaling.get("rope_type", legacy_scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"config.json rope_parameters.rope_type: expected 'default' (plain RoPE), received "
                         f"{rope_type!r}")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    pad = hf.get("pad_token_id")
    num_experts = hf.get("num_experts", 0) or 0
    moe = None
    if num_experts > 0:
        moe = dict(num_experts=num_experts, num_experts_per_tok=hf["num_experts_per_tok"],
                   moe_intermediate_size=hf["moe_intermediate_size"],
                   shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
                   norm_topk_prob=hf.get("norm_topk_prob", True), decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                   mlp_only_layers=list(hf.get("mlp_only_layers") or []),
                   router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hidden, num_layers=n_layers,
        layers=[_LAYER_TYPES[t] for t in layer_types],
        attention=dict(num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
                       head_dim=hf.get("head_dim") or hidden // heads, position="rope",
                       rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
                       partial_rotary_factor=float(rope.get("partial_rotary_factor",
                                                            hf.get("partial_rotary_factor", 0.25))),
                       output_gate=True, qk_norm=True, bias=bool(hf.get("attention_bias", False))),
        linear=dict(num_heads=hf["linear_num_key_heads"], num_v_heads=hf["linear_num_value_heads"],
                    head_dim=hf["linear_key_head_dim"], v_head_dim=hf["linear_value_head_dim"],
                    conv_size=hf.get("linear_conv_kernel_dim", 4)),
        ffn=dict(kind="swiglu", intermediate_size=hf["intermediate_size"]),
        moe=moe, norm="rms_zero_centred", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        pad_token_id=pad if pad is not None else (eos if eos is not None else 0), eos_token_id=eos,
    )


def config_to_transformers(config: ModelConfig, *, dtype: torch.dtype | None = None) -> dict:
    """The transformers ``config.json`` dict of a Qwen3-Next-shaped ``ModelConfig``.

    Raises:
        ValueError: the model is not expressible as Qwen3-Next (another mixer, plain norms, no output gate or
            q/k norm, positions other than RoPE, a sliding window, a non-SwiGLU MLP, MoE without a shared expert);
            the message names the field.
    """
    types = config.layer_types
    inverse = {v: k for k, v in _LAYER_TYPES.items()}
    for i, name in enumerate(types):
        if name not in inverse:
            raise ValueError(f"layers[{i}]: expected 'gated_deltanet' or 'attention' to export as Qwen3-Next, "
                             f"received {name!r}")
    att, lin, moe = config.attention, config.linear, config.moe
    checks = [("norm", config.norm, "rms_zero_centred"), ("attention.position", att.position, "rope"),
              ("attention.output_gate", att.output_gate, True), ("attention.qk_norm", att.qk_norm, True),
              ("attention.window", att.window, None), ("ffn.kind", config.ffn.kind, "swiglu"),
              ("ffn.bias", config.ffn.bias, False)]
    if moe is not None and moe.shared_expert_intermediate_size == 0:
        checks.append(("moe.shared_expert_intermediate_size", 0, "> 0 (transformers always has a shared expert)"))
    for name, value, expected in checks:
        if value != expected:
            raise ValueError(f"{name}: expected {expected!r} to export as Qwen3-Next, received {value!r}")
    hf = {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_hidden_layers": config.num_layers,
        "layer_types": [inverse[t] for t in types],
        "num_attention_heads": att.num_heads, "num_key_value_heads": att.kv_heads(),
        "head_dim": att.dim(config.d_model), "attention_bias": att.bias, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": att.rope_theta,
                            "partial_rotary_factor": att.partial_rotary_factor},
        "linear_num_key_heads": lin.num_heads, "linear_num_value_heads": lin.v_heads(),
        "linear_key_head_dim": lin.k_dim(config.d_model), "linear_value_head_dim": lin.v_dim(config.d_model),
        "linear_conv_kernel_dim": lin.conv_size,
        "hidden_act": "silu", "intermediate_size": config.ffn.hidden(config.d_model),
        "num_experts": 0 if moe is None else moe.num_experts,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
    }
    if moe is not None:
        hf.update(num_experts_per_tok=moe.num_experts_per_tok, moe_intermediate_size=moe.moe_intermediate_size,
                  shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
                  norm_topk_prob=moe.norm_topk_prob, decoder_sparse_step=moe.decoder_sparse_step,
                  mlp_only_layers=list(moe.mlp_only_layers), router_aux_loss_coef=moe.router_aux_loss_coef)
    if dtype is not None:
        hf["dtype"] = str(dtype).removeprefix("torch.")
    return hf


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

    directory = Path(directory)
    index = directory / _INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"directory: expected model.safetensors or {_INDEX} in {directory}, found neither")
    tensors = {}
    for name in files:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{_INDEX}: lists shard {name}, which is not in {directory}")
        tensors.update(load_file(str(directory / name), device=str(device)))
    return tensors


def load(directory, *, dtype: torch.dtype | None = None, device=None):
    """A ``HybridLM`` from a transformers-format Qwen3-Next directory (see the module docstring).

    Args:
        directory: holds ``config.json`` and the safetensors file(s).
        dtype: cast the weights to this dtype; None keeps the checkpoint's dtype.
        device: where to put the model; None = CPU.

    Raises:
        ValueError: unsupported config fields, unknown / missing / mis-shaped tensors (named).
    """
    from hybridattn.models.hybrid_lm import HybridLM

    directory = Path(directory)
    config = config_from_transformers(json.loads((directory / "config.json").read_text()))
    with torch.device("meta"):
        skeleton = HybridLM(config)  # no memory and no random init: the checkpoint provides every tensor
    # passed on without keeping a reference, so the mapping can free tensors as it goes
    state = state_dict_from_transformers(read_safetensors(directory, device="cpu" if device is None else device),
                                         skeleton.state_dict(), config)
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

    directory = Path(directory)
    state = model.state_dict()
    dtype = next(iter(state.values())).dtype
    hf_config = config_to_transformers(model.config, dtype=dtype)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict_to_transformers(state, model.config).items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
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
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n")
