"""``ModelConfig``: everything needed to build a ``HybridLM``, validated on construction, saved as JSON.

Per-mixer options live in nested sub-configs (``attention``, ``linear``, ``ffn``, ``moe``) instead of flat
keyword arguments; options of user-registered mixers go in ``mixer_options[name]`` (a plain dict).

The layer layout is given one of three ways (see ``hybridattn.models.layout``): ``layers=[names]``,
``hybrid="3:1"`` (the default) or ``pattern="(gdn*3,attn)*4"``. ``config.layer_types`` is the resolved list.

Example::

    cfg = ModelConfig.preset("qwen3-next-tiny", num_layers=8)
    cfg = ModelConfig(d_model=256, num_layers=12, hybrid="7:1", linear_mixer="gla")
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hybridattn.models.layout import resolve_layout
from hybridattn.ops.positions import check_rope_scaling


def _err(name: str, expected: str, value) -> ValueError:
    return ValueError(f"{name}: expected {expected}, received {value!r}")


def _check_int(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, received {type(value).__name__}")
    if value < minimum:
        raise _err(name, f"an int >= {minimum}", value)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise _err(name, f"one of {tuple(choices)}", value)


def _check_coef(name: str, value) -> None:
    _check_float(name, value, minimum=0.0)


def _check_float(name: str, value, *, minimum: float | None = None, positive: bool = False) -> None:
    """A finite real number (``bool`` refused), ``> 0`` when ``positive``, ``>= minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, received {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (positive and not value > 0) or (minimum is not None and not value >= minimum):
        bound = " > 0" if positive else (f" >= {minimum:g}" if minimum is not None else "")
        raise _err(name, f"a finite float{bound}", value)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, received {type(value).__name__} {value!r}")


def _check_token_id(name: str, value, vocab_size: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected {'None or ' if optional else ''}an int, received "
                        f"{type(value).__name__} {value!r}")
    if not 0 <= value < vocab_size:
        raise _err(name, f"{'None or ' if optional else ''}an id in [0, vocab_size={vocab_size})", value)


@dataclass
class AttentionConfig:
    """Softmax layers (mixer ``attention``)."""

    num_heads: int = 4                 # query heads
    num_kv_heads: int | None = None    # key/value heads (GQA: num_heads % num_kv_heads == 0); None = num_heads
    head_dim: int | None = None        # None = d_model // num_heads
    position: str = "rope"             # "rope", "alibi", "t5" (learned bucketed bias) or "none" (NoPE)
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0  # fraction of head_dim that RoPE rotates (Qwen3-Next: 0.25)
    rope_scaling: dict | None = None   # context extension, e.g. {"rope_type": "yarn", "factor": 4.0,
                                       # "original_max_position_embeddings": 32768}; see ops.positions.ROPE_SCALING
    output_gate: bool = False          # sigmoid output gate from the query projection (Qwen3-Next)
    qk_norm: bool = False              # RMSNorm over each q and k head (Qwen3-Next)
    window: int | None = None          # sliding window; the KV cache becomes a ring buffer of `window` entries
    bias: bool = False                 # biases on the q/k/v/o projections

    def validate(self, d_model: int) -> None:
        _check_int("attention.num_heads", self.num_heads)
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        _check_int("attention.num_kv_heads", kv)
        if self.num_heads % kv:
            raise _err("attention.num_kv_heads", f"a divisor of attention.num_heads={self.num_heads}", kv)
        if self.head_dim is None and d_model % self.num_heads:
            raise _err("attention.head_dim", f"a value (d_model={d_model} is not divisible by num_heads)", None)
        if self.head_dim is not None:
            _check_int("attention.head_dim", self.head_dim)
        _check_choice("attention.position", self.position, ("rope", "alibi", "t5", "none"))
        _check_float("attention.rope_theta", self.rope_theta, positive=True)
        _check_float("attention.partial_rotary_factor", self.partial_rotary_factor, positive=True)
        for flag in ("output_gate", "qk_norm", "bias"):
            _check_bool(f"attention.{flag}", getattr(self, flag))
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise _err("attention.partial_rotary_factor", "a float in (0, 1]", self.partial_rotary_factor)
        rotated = int(self.dim(d_model) * self.partial_rotary_factor)
        if self.position == "rope" and (rotated == 0 or rotated % 2):
            raise _err("attention.partial_rotary_factor",
                       f"a fraction of head_dim={self.dim(d_model)} giving an even, positive channel count",
                       self.partial_rotary_factor)
        if self.position != "rope" and self.rope_scaling is not None:
            raise _err("attention.rope_scaling", f"None with attention.position={self.position!r}", self.rope_scaling)
        if self.position == "rope":
            self.rope_scaling = check_rope_scaling(self.rope_scaling, name="attention.rope_scaling",
                                                   rotary_dim=rotated)
        if self.window is not None:
            _check_int("attention.window", self.window)

    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.num_heads


@dataclass
class LinearConfig:
    """Options shared by the linear mixers (``gated_deltanet``, ``deltanet``, ``gla``, ``retention``,
    ``mamba2``, ``linear``). For ``mamba2``: ``num_heads`` = groups of B/C, ``num_v_heads`` = SSM heads,
    ``head_dim`` = state size N, ``v_head_dim`` = SSM head dim P."""

    num_heads: int = 4                 # query/key heads Hk
    num_v_heads: int | None = None     # value heads Hv (GVA: Hv % Hk == 0); None = num_heads
    head_dim: int | None = None        # key head dim Dk; None = d_model // num_heads
    v_head_dim: int | None = None      # value head dim Dv; None = head_dim
    conv_size: int = 4                 # depthwise causal short-conv kernel over q/k/v; 0 = no conv
    chunk_size: int = 64               # chunk length of the chunked (prefill) form
    feature_map: str = "elu+1"         # mixer `linear` only: identity, relu, elu+1, taylor (Based), favor (FAVOR+)
    gate_low_rank: int = 16            # mixer `gla` only: rank of the low-rank forget-gate projection

    def validate(self, d_model: int) -> None:
        _check_int("linear.num_heads", self.num_heads)
        hv = self.v_heads()
        _check_int("linear.num_v_heads", hv)
        if hv % self.num_heads:
            raise _err("linear.num_v_heads", f"a multiple of linear.num_heads={self.num_heads}", hv)
        if self.head_dim is None and d_model % self.num_heads:
            raise _err("linear.head_dim", f"a value (d_model={d_model} is not divisible by num_heads)", None)
        for name in ("head_dim", "v_head_dim"):
            if getattr(self, name) is not None:
                _check_int(f"linear.{name}", getattr(self, name))
        _check_int("linear.conv_size", self.conv_size, minimum=0)
        if self.conv_size == 1:
            raise _err("linear.conv_size", "0 (no conv) or >= 2", 1)
        _check_int("linear.chunk_size", self.chunk_size)
        _check_int("linear.gate_low_rank", self.gate_low_rank)
        _check_choice("linear.feature_map", self.feature_map, ("identity", "relu", "elu+1", "taylor", "favor"))

    def v_heads(self) -> int:
        return self.num_heads if self.num_v_heads is None else self.num_v_heads

    def k_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.num_heads

    def v_dim(self, d_model: int) -> int:
        return self.v_head_dim or self.k_dim(d_model)


@dataclass
class FFNConfig:
    """Dense feed-forward of each block."""

    kind: str = "swiglu"               # "swiglu", "gelu", or any name registered with layers.mlp.register_ffn
    intermediate_size: int | None = None  # None = 4 * d_model (gelu) or 8/3 * d_model rounded to 64 (swiglu)
    bias: bool = False                 # biases in the gelu MLP (GPT-2 style); SwiGLU has none

    def validate(self) -> None:
        if not isinstance(self.kind, str):
            raise TypeError(f"ffn.kind: expected a str, received {type(self.kind).__name__} {self.kind!r}")
        if self.intermediate_size is not None:
            _check_int("ffn.intermediate_size", self.intermediate_size)
        _check_bool("ffn.bias", self.bias)

    def hidden(self, d_model: int) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 4 * d_model if self.kind == "gelu" else 64 * -(-(8 * d_model // 3) // 64)


@dataclass
class MoEConfig:
    """Sparse mixture-of-experts feed-forward (Qwen3-Next); built through ``register_ffn("moe")``."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    norm_topk_prob: bool = True        # renormalise the top-k router probabilities
    decoder_sparse_step: int = 1       # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    router_aux_loss_coef: float = 0.001

    def validate(self) -> None:
        _check_int("moe.num_experts", self.num_experts)
        _check_int("moe.num_experts_per_tok", self.num_experts_per_tok)
        if self.num_experts_per_tok > self.num_experts:
            raise _err("moe.num_experts_per_tok", f"<= moe.num_experts={self.num_experts}", self.num_experts_per_tok)
        _check_int("moe.moe_intermediate_size", self.moe_intermediate_size)
        _check_int("moe.shared_expert_intermediate_size", self.shared_expert_intermediate_size, minimum=0)
        _check_int("moe.decoder_sparse_step", self.decoder_sparse_step)
        _check_coef("moe.router_aux_loss_coef", self.router_aux_loss_coef)
        _check_bool("moe.norm_topk_prob", self.norm_topk_prob)
        if not isinstance(self.mlp_only_layers, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.mlp_only_layers):
            raise _err("moe.mlp_only_layers", "a list of layer indices (ints >= 0)", self.mlp_only_layers)
        self.mlp_only_layers = list(self.mlp_only_layers)

    def is_sparse(self, layer_idx: int) -> bool:
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0


_NESTED = {"attention": AttentionConfig, "linear": LinearConfig, "ffn": FFNConfig, "moe": MoEConfig}


@dataclass
class ModelConfig:
    """Configuration of a ``HybridLM``. Raises ``ValueError``/``TypeError`` naming the field when invalid."""

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    # layer layout: at most one of these three; none = hybrid "3:1"
    layers: list[str] | None = None    # explicit mixer name per layer
    hybrid: str | None = None          # "L:S" ratio, softmax at the end of each period ("3:1" -> 3, 7, 11...)
    pattern: str | None = None         # pattern string, e.g. "LLLA" or "(gdn*3,attn)*4"
    linear_mixer: str = "gated_deltanet"  # what "L" and the linear part of `hybrid` mean
    softmax_mixer: str = "attention"      # what "A" and the softmax part of `hybrid` mean
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    moe: MoEConfig | None = None       # when set, sparse layers (moe.is_sparse) use the "moe" feed-forward
    mixer_options: dict[str, dict] = field(default_factory=dict)  # per-mixer options, e.g. {"dsa": {"top_k": 64}}
    # weight of the DSA indexer's KL loss in HybridLM.aux_loss. Only the indexer receives its gradient and only
    # from it (DeepSeek-V3.2 trains the indexer separately), so under Adam the weight mostly sets the indexer's
    # share of the clipped gradient norm; 1.0 adds it as DeepSeek does. 0 still computes it (zero gradients keep
    # DDP's every-parameter-used check satisfied) but leaves the indexer at its initialisation.
    indexer_aux_loss_coef: float = 1.0
    norm: str = "rms"                  # "rms": x/rms(x)*w; "rms_zero_centred": x/rms(x)*(1+w) (Qwen3-Next)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True        # lm_head shares the embedding matrix
    initializer_range: float = 0.02    # std of the normal init of linear and embedding weights
    pad_token_id: int = 0              # written after a row stopped, in `generate`
    eos_token_id: int | None = None    # default stop token of `generate`
    # config fields of an imported checkpoint (e.g. a transformers config.json) that the mapping does not
    # reproduce, {key: {"source": value read, "mapped": value the mapping writes}}; written back on export
    source_fields: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        for name, cls in _NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, prefix=name + "."))
            elif not isinstance(value, cls) and not (value is None and name == "moe"):
                expected = f"{cls.__name__} or dict" + (" or None" if name == "moe" else "")
                raise TypeError(f"{name}: expected {expected}, received {type(value).__name__}")
        self.validate()

    # -- validation and derived values -------------------------------------------------------------------
    def validate(self) -> None:
        from hybridattn.layers.registry import available_mixers, mixer_entry

        _check_int("vocab_size", self.vocab_size)
        _check_int("d_model", self.d_model)
        _check_int("num_layers", self.num_layers)
        _check_choice("norm", self.norm, ("rms", "rms_zero_centred"))
        _check_float("norm_eps", self.norm_eps, positive=True)
        _check_token_id("pad_token_id", self.pad_token_id, self.vocab_size)
        _check_token_id("eos_token_id", self.eos_token_id, self.vocab_size, optional=True)
        _check_bool("tie_embeddings", self.tie_embeddings)
        known = available_mixers()
        for name in ("linear_mixer", "softmax_mixer"):
            _check_choice(name, getattr(self, name), known)
        types = self.layer_types
        for i, name in enumerate(types):
            if name not in known:
                raise _err(f"layers[{i}]", f"a registered mixer {tuple(known)}", name)
        if not isinstance(self.mixer_options, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in self.mixer_options.items()):
            raise _err("mixer_options", "a dict of {mixer name: dict of options}", self.mixer_options)
        for name, given in self.mixer_options.items():
            accepted = mixer_entry(name).options if name in known else None  # a mixer registered later: unchecked
            unknown = sorted(set(given) - set(accepted or ()))
            if accepted is not None and unknown:
                raise _err(f"mixer_options[{name!r}]", f"keys among {sorted(accepted)}", unknown)
        _check_coef("indexer_aux_loss_coef", self.indexer_aux_loss_coef)
        if any(n != self.softmax_mixer for n in types) or self.linear_mixer in types:
            self.linear.validate(self.d_model)
        self.attention.validate(self.d_model)
        self.ffn.validate()
        if self.moe is not None:
            self.moe.validate()
        _check_float("initializer_range", self.initializer_range, positive=True)
        if not isinstance(self.source_fields, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) and set(v) <= {"source", "mapped"}
                for k, v in self.source_fields.items()):
            raise _err("source_fields", 'a dict of {field name: {"source": ..., "mapped": ...}}', self.source_fields)

    def check_decoder_layout(self) -> None:
        """Raise ``ValueError`` naming ``layers[i]`` when a layer's mixer is not causal (registered with
        ``causal=False``, e.g. Linformer, LSH): a decoder-only model trained on next-token loss would see the
        future through it. ``HybridLM`` and the memory planner call this; the config itself stays valid so that
        such mixers can still be built from it as standalone modules."""
        from hybridattn.layers.registry import is_causal_mixer

        for i, name in enumerate(self.layer_types):
            if not is_causal_mixer(name):
                raise _err(f"layers[{i}]", "a causal mixer: a decoder-only HybridLM would let every position see "
                           f"later tokens through {name!r} (registered causal=False); use it outside HybridLM", name)

    @property
    def layer_types(self) -> list[str]:
        """The mixer name of every layer (the layout resolved)."""
        return resolve_layout(num_layers=self.num_layers, layers=self.layers, hybrid=self.hybrid,
                              pattern=self.pattern, linear=self.linear_mixer, softmax=self.softmax_mixer)

    def ffn_kind(self, layer_idx: int) -> str:
        """Feed-forward kind of layer ``layer_idx``: ``"moe"`` on sparse layers when ``moe`` is set."""
        return "moe" if self.moe is not None and self.moe.is_sparse(layer_idx) else self.ffn.kind

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes`` applied (changing the layout clears the other layout fields)."""
        data = self.to_dict()
        if {"layers", "hybrid", "pattern"} & changes.keys():
            data.update(layers=None, hybrid=None, pattern=None)
        data.update(changes)
        return ModelConfig.from_dict(data)

    # -- serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return _from_dict(cls, data)

    def to_json(self, path=None, *, indent: int = 2) -> str:
        """The config as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            from hybridattn.models.checkpoint import write_text_atomic

            write_text_atomic(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "ModelConfig":
        """Read a config from JSON text or from a file path.

        Raises:
            ValueError: the text is not JSON (naming the file), or a field is invalid.
            TypeError: the JSON is not an object, or a field has the wrong type.
        """
        text, source = str(text_or_path), "config"
        if not text.lstrip().startswith("{"):
            source = str(text_or_path)
            text = Path(text_or_path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: expected a JSON object, the text is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise TypeError(f"{source}: expected a JSON object, received {type(data).__name__}")
        return cls.from_dict(data)

    # -- presets -------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named configuration (see ``PRESETS``); keyword ``overrides`` replace its fields."""
        if name not in PRESETS:
            raise _err("name", f"one of {tuple(PRESETS)}", name)
        data = cls(**PRESETS[name]).to_dict()
        if {"layers", "hybrid", "pattern"} & overrides.keys():
            data.update(layers=None, hybrid=None, pattern=None)
        data.update(overrides)
        return cls.from_dict(data)


def _from_dict(cls, data: dict, *, prefix: str = ""):
    if not isinstance(data, dict):
        raise TypeError(f"{prefix.rstrip('.') or 'config'}: expected a dict, received {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown field; expected one of {sorted(names)}")
    return cls(**data)


def _tiny_qwen3_next() -> dict:
    return dict(
        vocab_size=256, d_model=128, num_layers=8, hybrid="3:1", linear_mixer="gated_deltanet",
        attention=dict(num_heads=4, num_kv_heads=2, head_dim=32, partial_rotary_factor=0.25,
                       rope_theta=10_000_000.0, output_gate=True, qk_norm=True),
        linear=dict(num_heads=2, num_v_heads=4, head_dim=32, v_head_dim=32, conv_size=4),
        ffn=dict(kind="swiglu", intermediate_size=256), norm="rms_zero_centred", tie_embeddings=False,
    )


#: Named configurations. The tiny ones are for tests and demos; "qwen3-next-80b" has the published sizes of
#: Qwen3-Next-80B-A3B (for the memory planner; building it needs ~160 GB of bf16 weights).
PRESETS: dict[str, dict] = {
    "qwen3-next-tiny": _tiny_qwen3_next(),
    "gpt-tiny": dict(
        vocab_size=256, d_model=128, num_layers=4, hybrid="0:1",
        attention=dict(num_heads=4), ffn=dict(kind="gelu", bias=True), tie_embeddings=True,
    ),
    "gated-deltanet-tiny": dict(
        vocab_size=256, d_model=128, num_layers=4, hybrid="1:0", linear_mixer="gated_deltanet",
        linear=dict(num_heads=2, num_v_heads=4, head_dim=32, v_head_dim=32),
    ),
    "mamba2-tiny": dict(
        vocab_size=256, d_model=128, num_layers=4, hybrid="1:0", linear_mixer="mamba2",
        linear=dict(num_heads=1, num_v_heads=8, head_dim=16, v_head_dim=32), ffn=dict(kind="swiglu"),
    ),
    "qwen3-next-80b": dict(
        vocab_size=151_936, d_model=2048, num_layers=48, hybrid="3:1", linear_mixer="gated_deltanet",
        attention=dict(num_heads=16, num_kv_heads=2, head_dim=256, partial_rotary_factor=0.25,
                       rope_theta=10_000_000.0, output_gate=True, qk_norm=True),
        linear=dict(num_heads=16, num_v_heads=32, head_dim=128, v_head_dim=128, conv_size=4),
        ffn=dict(kind="swiglu", intermediate_size=5120),
        moe=dict(num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
                 shared_expert_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1),
        norm="rms_zero_centred", tie_embeddings=False, eos_token_id=151_645,
    ),
}
