"""Registers :class:`hybridattn.layers.attention.MultiHeadAttention` as the ``attention`` mixer, built from a
config's ``attention`` section (GQA, RoPE/ALiBi/T5/NoPE, Qwen3-Next's output gate, q/k norm and partial RoPE,
optional sliding window)."""

from __future__ import annotations

from hybridattn.layers.registry import register_mixer


@register_mixer("attention", softmax=True, options=())  # sized by config.attention, no own options
def build_attention(config, layer_idx: int):
    # Imported here so that listing the registry does not pull in the softmax kernels.
    from hybridattn.layers.attention import MultiHeadAttention

    att = config.attention
    return MultiHeadAttention(
        config.d_model, att.num_heads, n_kv_heads=att.kv_heads(), head_dim=att.dim(config.d_model),
        positions=att.position, rope_theta=att.rope_theta, rotary_fraction=att.partial_rotary_factor,
        rope_scaling=att.rope_scaling,
        qk_norm=att.qk_norm, zero_centered_norm=config.norm == "rms_zero_centred", norm_eps=config.norm_eps,
        output_gate=att.output_gate, bias=att.bias, window=att.window,
    )
