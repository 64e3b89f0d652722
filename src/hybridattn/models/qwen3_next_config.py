"""Qwen3-Next ``config.json`` (transformers) <-> ``ModelConfig``; the field table is in ``models/qwen3_next.py``.

RoPE: ``rope_parameters`` (or the legacy top-level ``rope_theta`` / ``partial_rotary_factor`` / ``rope_scaling``)
gives ``attention.rope_theta``, ``.partial_rotary_factor`` and ``.rope_scaling``; the scaling types are those of
``hybridattn.ops.positions.ROPE_SCALING`` (linear, dynamic, yarn, llama3, longrope), with transformers' defaults
resolved on import: ``original_max_position_embeddings`` (a top-level field wins, else ``max_position_embeddings``),
a missing yarn / longrope ``factor`` (``max_position_embeddings / original_max_position_embeddings``). Dynamic NTK
scales beyond ``max_position_embeddings`` in transformers; hybridattn keeps that length as the scaling dict's
``original_max_position_embeddings``, and exports it back as ``max_position_embeddings``.

Exact round trip: whatever of ``config.json`` the mapping does not reproduce (fields hybridattn does not use, such
as ``bos_token_id``, ``architectures``, ``max_position_embeddings``, unknown keys; and fields it normalises, such as
a list ``eos_token_id``, ``pad_token_id: null``, legacy RoPE fields, ``full_attention_interval``) is kept in
``ModelConfig.source_fields`` as ``{key: {"source": value read, "mapped": value the mapping writes}}`` ("source"
or "mapped" left out where that side has no such key). Export writes "source" back for every key whose mapped value
is still "mapped"; a value changed in hybridattn since the import is written as it now is.
"""

from __future__ import annotations

from typing import Mapping

import torch

from hybridattn.models.config import ModelConfig
from hybridattn.ops.positions import ROPE_SCALING, check_rope_scaling, rope_scaling_fields

MODEL_TYPE = "qwen3_next"
_LAYER_TYPES = {"linear_attention": "gated_deltanet", "full_attention": "attention"}
_ORIGINAL = "original_max_position_embeddings"


# -- RoPE --------------------------------------------------------------------------------------------------------
def rope_from_transformers(hf: Mapping) -> tuple[float, float, dict | None]:
    """``(rope_theta, partial_rotary_factor, rope_scaling)`` of a transformers config dict (see the module doc).

    Raises:
        ValueError: a ``rope_type`` hybridattn does not run, or a scaling that lacks a field its type needs (the
            message names the field and the supported values).
    """
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})  # transformers: rope_scaling wins
    if isinstance(params.get("full_attention"), dict):  # nested per layer type: only attention layers use RoPE
        params = dict(params["full_attention"])
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10_000.0)))
    fraction = float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25)))
    if rope_type == "default":
        return theta, fraction, None
    if rope_type not in ROPE_SCALING:
        raise ValueError(f"config.json rope_parameters.rope_type: expected one of "
                         f"{('default',) + tuple(ROPE_SCALING)}, received {rope_type!r}")
    max_len = hf.get("max_position_embeddings", 32768)
    if rope_type == "dynamic":
        params[_ORIGINAL] = max_len  # transformers scales past max_position_embeddings
    else:
        params[_ORIGINAL] = hf.get(_ORIGINAL) or params.get(_ORIGINAL) or max_len
    if rope_type in ("yarn", "longrope") and params.get("factor") is None:
        params["factor"] = max_len / params[_ORIGINAL]
    accepted = set().union(*rope_scaling_fields(rope_type))
    scaling = {"rope_type": rope_type, **{k: v for k, v in params.items() if k in accepted}}
    return theta, fraction, check_rope_scaling(scaling, name="config.json rope_parameters")


def rope_to_transformers(att) -> tuple[dict, dict]:
    """``(rope_parameters, top-level fields)`` of an ``AttentionConfig``: the inverse of
    :func:`rope_from_transformers` (dynamic NTK's length goes to ``max_position_embeddings``)."""
    rope = {"rope_type": "default", "rope_theta": att.rope_theta, "partial_rotary_factor": att.partial_rotary_factor}
    scaling = dict(att.rope_scaling or {})
    top = {}
    if scaling.get("rope_type") == "dynamic":
        top["max_position_embeddings"] = scaling.pop(_ORIGINAL)
    rope.update(scaling)
    return rope, top


# -- fields kept for an exact round trip -------------------------------------------------------------------------
def source_fields(source: Mapping, mapped: Mapping) -> dict:
    """``{key: {"source": ..., "mapped": ...}}`` for every key whose value differs between ``source`` (the
    config.json read) and ``mapped`` (what the mapping writes for it); a side without the key has no entry."""
    out = {}
    for key in sorted(set(source) | set(mapped)):
        record = {side: d[key] for side, d in (("source", source), ("mapped", mapped)) if key in d}
        if len(record) == 1 or record["source"] != record["mapped"]:
            out[key] = record
    return out


def restore_source_fields(mapped: dict, fields: Mapping) -> dict:
    """``mapped`` with every key whose value still equals the recorded "mapped" one put back as in the source."""
    out = dict(mapped)
    for key, record in fields.items():
        if ("mapped" in record) != (key in out) or ("mapped" in record and out[key] != record["mapped"]):
            continue  # changed since the import: hybridattn's value stands
        if "source" in record:
            out[key] = record["source"]
        else:
            del out[key]
    return out


def _dtype_of(hf: Mapping) -> torch.dtype | None:
    name = hf.get("dtype") or hf.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


# -- config ------------------------------------------------------------------------------------------------------
def _required(hf: Mapping, key: str):
    if key not in hf:
        raise ValueError(f"config.json {key}: a required field of a {MODEL_TYPE} config is missing")
    return hf[key]


def config_from_transformers(hf: Mapping) -> ModelConfig:
    """A ``ModelConfig`` from a transformers ``Qwen3NextConfig`` dict (``config.json``); the fields it does not
    reproduce are kept in ``source_fields`` (see the module docstring).

    Raises:
        ValueError: ``model_type`` is not ``qwen3_next``, or a field asks for something hybridattn does not run
            (an activation other than SiLU, an unsupported RoPE type, an unknown layer type); the message names the
            field.
    """
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"config.json model_type: expected {MODEL_TYPE!r}, received {hf.get('model_type')!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act: expected 'silu', received {hf['hidden_act']!r}")
    n_layers = _required(hf, "num_hidden_layers")
    layer_types = hf.get("layer_types")
    if layer_types is None:
        interval = hf.get("full_attention_interval", 4)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"config.json full_attention_interval: expected an int >= 1, received {interval!r}")
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    for i, kind in enumerate(layer_types):
        if kind not in _LAYER_TYPES:
            raise ValueError(f"config.json layer_types[{i}]: expected one of {tuple(_LAYER_TYPES)}, received {kind!r}")
    theta, fraction, scaling = rope_from_transformers(hf)
    hidden, heads = _required(hf, "hidden_size"), _required(hf, "num_attention_heads")
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    pad = hf.get("pad_token_id")
    num_experts = hf.get("num_experts", 0) or 0
    moe = None
    if num_experts > 0:
        moe = dict(num_experts=num_experts, num_experts_per_tok=_required(hf, "num_experts_per_tok"),
                   moe_intermediate_size=_required(hf, "moe_intermediate_size"),
                   shared_expert_intermediate_size=_required(hf, "shared_expert_intermediate_size"),
                   norm_topk_prob=hf.get("norm_topk_prob", True), decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                   mlp_only_layers=list(hf.get("mlp_only_layers") or []),
                   router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    config = ModelConfig(
        vocab_size=_required(hf, "vocab_size"), d_model=hidden, num_layers=n_layers,
        layers=[_LAYER_TYPES[t] for t in layer_types],
        attention=dict(num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
                       head_dim=hf.get("head_dim") or hidden // heads, position="rope", rope_theta=theta,
                       partial_rotary_factor=fraction, rope_scaling=scaling,
                       output_gate=True, qk_norm=True, bias=bool(hf.get("attention_bias", False))),
        linear=dict(num_heads=_required(hf, "linear_num_key_heads"), num_v_heads=_required(hf, "linear_num_value_heads"),
                    head_dim=_required(hf, "linear_key_head_dim"), v_head_dim=_required(hf, "linear_value_head_dim"),
                    conv_size=hf.get("linear_conv_kernel_dim", 4)),
        ffn=dict(kind="swiglu", intermediate_size=_required(hf, "intermediate_size")),
        moe=moe, norm="rms_zero_centred", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        pad_token_id=pad if pad is not None else (eos if eos is not None else 0), eos_token_id=eos,
    )
    config.source_fields = source_fields(hf, _mapped_fields(config, dtype=_dtype_of(hf)))
    return config


def config_to_transformers(config: ModelConfig, *, dtype: torch.dtype | None = None) -> dict:
    """The transformers ``config.json`` dict of a Qwen3-Next-shaped ``ModelConfig``, with the fields of an
    imported config.json that hybridattn did not change written as they were (``config.source_fields``).

    Raises:
        ValueError: the model is not expressible as Qwen3-Next (another mixer, plain norms, no output gate or
            q/k norm, positions other than RoPE, a sliding window, a non-SwiGLU MLP, MoE without a shared expert);
            the message names the field.
    """
    return restore_source_fields(_mapped_fields(config, dtype=dtype), config.source_fields)


def _mapped_fields(config: ModelConfig, *, dtype: torch.dtype | None) -> dict:
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
    rope, rope_top = rope_to_transformers(att)
    hf = {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_hidden_layers": config.num_layers,
        "layer_types": [inverse[t] for t in types],
        "num_attention_heads": att.num_heads, "num_key_value_heads": att.kv_heads(),
        "head_dim": att.dim(config.d_model), "attention_bias": att.bias, "attention_dropout": 0.0,
        "rope_parameters": rope, **rope_top,
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
