"""Registers the sparse and approximate softmax mixers (layers/sparse_attention.py, dsa_attention.py,
whole_sequence_attention.py).

Sizes come from the config's ``attention`` section; each mixer's own options from ``mixer_options[name]``:

- ``sliding_window``: ``window`` (default: ``attention.window`` or 256), ring-buffer KV cache;
- ``longformer``: ``window`` (keys on each side, default 256), ``global_tokens`` (positions, default ``[0]``);
- ``bigbird``: ``window`` (blocks, 1), ``n_global`` (blocks, 1), ``n_random`` (blocks, 2), ``block`` (64), ``seed``;
- ``dsa``: ``top_k`` (64), ``index_heads`` (4), ``index_dim`` (32);
- ``linformer`` (bidirectional, no cache): ``max_len`` (512), ``proj_len`` (64);
- ``lsh`` (no cache): ``n_buckets`` (8), ``n_hashes`` (2), ``seed``.
"""

from __future__ import annotations

from hybridattn.layers.registry import register_mixer


def _attention_kwargs(config) -> dict:
    att = config.attention
    return dict(
        n_kv_heads=att.kv_heads(), head_dim=att.dim(config.d_model), positions=att.position,
        rope_theta=att.rope_theta, rotary_fraction=att.partial_rotary_factor,
        rope_scaling=att.rope_scaling, qk_norm=att.qk_norm,
        zero_centered_norm=config.norm == "rms_zero_centred", norm_eps=config.norm_eps,
        output_gate=att.output_gate, bias=att.bias,
    )


def _options(config, name: str, defaults: dict) -> dict:
    given = dict(config.mixer_options.get(name, {}))
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"mixer_options[{name!r}]: expected keys among {sorted(defaults)}, received {sorted(unknown)}")
    return {**defaults, **given}


@register_mixer("sliding_window", softmax=True)
def build_sliding_window(config, layer_idx: int):
    from hybridattn.layers.attention import MultiHeadAttention

    opt = _options(config, "sliding_window", {"window": config.attention.window or 256})
    return MultiHeadAttention(config.d_model, config.attention.num_heads, window=opt["window"],
                              **_attention_kwargs(config))


@register_mixer("longformer", softmax=True)
def build_longformer(config, layer_idx: int):
    from hybridattn.layers.sparse_attention import PatternAttention
    from hybridattn.ops import masks

    opt = _options(config, "longformer", {"window": 256, "global_tokens": [0]})
    return PatternAttention(config.d_model, config.attention.num_heads,
                            pattern=masks.longformer(opt["window"], opt["global_tokens"]), **_attention_kwargs(config))


@register_mixer("bigbird", softmax=True)
def build_bigbird(config, layer_idx: int):
    from hybridattn.layers.sparse_attention import PatternAttention
    from hybridattn.ops import masks

    opt = _options(config, "bigbird", {"window": 1, "n_global": 1, "n_random": 2, "block": 64, "seed": 0})
    pattern = masks.bigbird(opt["window"], opt["n_global"], opt["n_random"], opt["block"], opt["seed"] + layer_idx,
                            causal=True)
    return PatternAttention(config.d_model, config.attention.num_heads, pattern=pattern, **_attention_kwargs(config))


@register_mixer("dsa", softmax=True)
def build_dsa(config, layer_idx: int):
    from hybridattn.layers.dsa_attention import DSAAttention

    att = config.attention
    opt = _options(config, "dsa", {"top_k": 64, "index_heads": 4, "index_dim": 32})
    return DSAAttention(config.d_model, att.num_heads, n_kv_heads=att.kv_heads(), head_dim=att.dim(config.d_model),
                        rope_theta=att.rope_theta, bias=att.bias, **opt)


@register_mixer("linformer", softmax=True)
def build_linformer(config, layer_idx: int):
    from hybridattn.layers.whole_sequence_attention import LinformerAttention

    opt = _options(config, "linformer", {"max_len": 512, "proj_len": 64})
    return LinformerAttention(config.d_model, config.attention.num_heads, bias=config.attention.bias, **opt)


@register_mixer("lsh", softmax=True)
def build_lsh(config, layer_idx: int):
    from hybridattn.layers.whole_sequence_attention import LSHAttention

    opt = _options(config, "lsh", {"n_buckets": 8, "n_hashes": 2, "seed": 0})
    return LSHAttention(config.d_model, config.attention.num_heads, bias=config.attention.bias, **opt)
