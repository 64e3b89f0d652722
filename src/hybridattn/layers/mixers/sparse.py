"""Registers the sparse and approximate softmax mixers (layers/sparse_attention.py, dsa_attention.py,
whole_sequence_attention.py).

Sizes come from the config's ``attention`` section; each mixer's own options from ``mixer_options[name]``:

- ``sliding_window``: ``window`` (default: ``attention.window`` or 256), ring-buffer KV cache;
- ``longformer``: ``window`` (keys on each side, default 256), ``global_tokens`` (positions, default ``[0]``);
- ``bigbird``: ``window`` (blocks, 1), ``n_global`` (blocks, 1), ``n_random`` (blocks, 2), ``block`` (64), ``seed``;
- ``dsa``: ``top_k`` (64), ``index_heads`` (4), ``index_dim`` (32); RoPE (partial, scaled) or no positions, q/k
  norm and output gate from ``attention``; ALiBi / T5 are refused (the sparse op takes no score bias);
- ``linformer`` (bidirectional, no cache): ``max_len`` (512), ``proj_len`` (64);
- ``lsh`` (no cache): ``n_buckets`` (8, 1 or even), ``n_hashes`` (2), ``seed``, ``allow_duplicates`` (False: a
  pair attended in several rounds counts once, as in the paper).

``linformer`` and ``lsh`` are registered ``causal=False``: Linformer mixes the whole sequence, and LSH's buckets and
chunks depend on every token, so a decoder-only ``HybridLM`` refuses them; they remain usable as modules (e.g.
in an encoder). They take no positions and split ``d_model`` evenly over ``attention.num_heads`` for q, k and v,
so ``attention`` fields they cannot honour (head_dim, ALiBi / T5, partial or scaled RoPE, q/k norm, output gate)
raise instead of being ignored; the default ``position="rope"`` is accepted and means nothing to them, and
``num_kv_heads`` does not apply (k and v keep ``num_heads`` heads).
"""

from __future__ import annotations

from hybridattn.layers.registry import register_mixer

SLIDING_WINDOW_OPTIONS = ("window",)  # its default comes from attention.window
LONGFORMER_OPTIONS = {"window": 256, "global_tokens": [0]}
BIGBIRD_OPTIONS = {"window": 1, "n_global": 1, "n_random": 2, "block": 64, "seed": 0}
DSA_OPTIONS = {"top_k": 64, "index_heads": 4, "index_dim": 32}
LINFORMER_OPTIONS = {"max_len": 512, "proj_len": 64}
LSH_OPTIONS = {"n_buckets": 8, "n_hashes": 2, "seed": 0, "allow_duplicates": False}

# attention fields a mixer may lack: field -> (is it at a value that changes nothing?, what is accepted)
_NEUTRAL = {
    "head_dim": (lambda att, d: att.head_dim is None or att.head_dim * att.num_heads == d,
                 "None or d_model // num_heads"),
    "position": (lambda att, d: att.position in ("rope", "none"), "'none' (or the default 'rope')"),
    "partial_rotary_factor": (lambda att, d: att.partial_rotary_factor == 1.0, "1.0"),
    "rope_scaling": (lambda att, d: att.rope_scaling is None, "None"),
    "qk_norm": (lambda att, d: not att.qk_norm, "False"),
    "output_gate": (lambda att, d: not att.output_gate, "False"),
}


def _refuse_unsupported(config, mixer: str, fields) -> None:
    """Raise ``ValueError`` naming the first ``attention.<field>`` of ``fields`` set to a value ``mixer`` would
    otherwise silently ignore."""
    att = config.attention
    for name in fields:
        neutral, accepted = _NEUTRAL[name]
        if not neutral(att, config.d_model):
            raise ValueError(f"attention.{name}: mixer {mixer!r} does not support it; expected {accepted}, "
                             f"received {getattr(att, name)!r}")


def _attention_kwargs(config) -> dict:
    att = config.attention
    return dict(
        n_kv_heads=att.kv_heads(), head_dim=att.dim(config.d_model), positions=att.position,
        rope_theta=att.rope_theta, rotary_fraction=att.partial_rotary_factor,
        rope_scaling=att.rope_scaling, qk_norm=att.qk_norm,
        zero_centered_norm=config.norm == "rms_zero_centred", norm_eps=config.norm_eps,
        output_gate=att.output_gate, bias=att.bias,
    )


def _options(config, name: str, defaults: dict, *, ints: dict[str, int] | None = None) -> dict:
    """``mixer_options[name]`` over ``defaults``; keys of ``ints`` must be ints >= their minimum. Errors name
    ``mixer_options['name'].key`` (ModelConfig already refuses unknown keys; this covers hand-made configs)."""
    given = dict(config.mixer_options.get(name, {}))
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"mixer_options[{name!r}]: expected keys among {sorted(defaults)}, received {sorted(unknown)}")
    opt = {**defaults, **given}
    for key, minimum in (ints or {}).items():
        value = opt[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"mixer_options[{name!r}].{key}: expected an int >= {minimum}, received {value!r}")
    return opt


@register_mixer("sliding_window", softmax=True, options=SLIDING_WINDOW_OPTIONS)
def build_sliding_window(config, layer_idx: int):
    from hybridattn.layers.attention import MultiHeadAttention

    opt = _options(config, "sliding_window", {"window": config.attention.window or 256}, ints={"window": 1})
    return MultiHeadAttention(config.d_model, config.attention.num_heads, window=opt["window"],
                              **_attention_kwargs(config))


@register_mixer("longformer", softmax=True, options=LONGFORMER_OPTIONS)
def build_longformer(config, layer_idx: int):
    from hybridattn.layers.sparse_attention import PatternAttention
    from hybridattn.ops import masks

    opt = _options(config, "longformer", LONGFORMER_OPTIONS, ints={"window": 0})
    return PatternAttention(config.d_model, config.attention.num_heads,
                            pattern=masks.longformer(opt["window"], opt["global_tokens"]), **_attention_kwargs(config))


@register_mixer("bigbird", softmax=True, options=BIGBIRD_OPTIONS)
def build_bigbird(config, layer_idx: int):
    from hybridattn.layers.sparse_attention import PatternAttention
    from hybridattn.ops import masks

    opt = _options(config, "bigbird", BIGBIRD_OPTIONS,
                   ints={"window": 0, "n_global": 0, "n_random": 0, "block": 1, "seed": 0})
    pattern = masks.bigbird(opt["window"], opt["n_global"], opt["n_random"], opt["block"], opt["seed"] + layer_idx,
                            causal=True)
    return PatternAttention(config.d_model, config.attention.num_heads, pattern=pattern, **_attention_kwargs(config))


@register_mixer("dsa", softmax=True, options=DSA_OPTIONS)
def build_dsa(config, layer_idx: int):
    from hybridattn.layers.dsa_attention import DSAAttention

    if config.attention.position not in ("rope", "none"):
        raise ValueError(f"attention.position: mixer 'dsa' supports 'rope' or 'none' (its sparse op takes no score "
                         f"bias), received {config.attention.position!r}")
    opt = _options(config, "dsa", DSA_OPTIONS, ints={"top_k": 1, "index_heads": 1, "index_dim": 1})
    return DSAAttention(config.d_model, config.attention.num_heads, **_attention_kwargs(config), **opt)


# whole-sequence mixers: fields they lack are refused rather than ignored. num_kv_heads is the exception: LSH
# shares q and k (so GQA has no meaning), and tests/layers/test_sparse_attention.py builds both from a GQA config
# expecting H heads for q, k and v, so it stays accepted and does not apply.
_WHOLE_SEQUENCE_REFUSED = ("head_dim", "position", "partial_rotary_factor", "rope_scaling", "qk_norm", "output_gate")


@register_mixer("linformer", softmax=True, causal=False, options=LINFORMER_OPTIONS)
def build_linformer(config, layer_idx: int):
    from hybridattn.layers.whole_sequence_attention import LinformerAttention

    _refuse_unsupported(config, "linformer", _WHOLE_SEQUENCE_REFUSED)
    opt = _options(config, "linformer", LINFORMER_OPTIONS, ints={"max_len": 1, "proj_len": 1})
    return LinformerAttention(config.d_model, config.attention.num_heads, bias=config.attention.bias, **opt)


@register_mixer("lsh", softmax=True, causal=False, options=LSH_OPTIONS)
def build_lsh(config, layer_idx: int):
    from hybridattn.layers.whole_sequence_attention import LSHAttention

    _refuse_unsupported(config, "lsh", _WHOLE_SEQUENCE_REFUSED)
    opt = _options(config, "lsh", LSH_OPTIONS, ints={"n_buckets": 1, "n_hashes": 1, "seed": 0})
    if not isinstance(opt["allow_duplicates"], bool):
        # checked here too so that the error names the config key, as _options does for the ints
        raise ValueError(f"mixer_options['lsh'].allow_duplicates: expected a bool, "
                         f"received {opt['allow_duplicates']!r}")
    return LSHAttention(config.d_model, config.attention.num_heads, bias=config.attention.bias, **opt)
