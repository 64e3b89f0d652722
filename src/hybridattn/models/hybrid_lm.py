"""``HybridLM``: a decoder-only language model whose layers mix linear and softmax attention.

    model = HybridLM(ModelConfig.preset("qwen3-next-tiny"))
    logits = model(input_ids)                              # [B, T, vocab]
    cache = model.new_cache(batch_size=B)
    logits, cache = model(prompt, cache=cache)             # prefill (chunk form), cache filled in place
    logits, cache = model(next_token, cache=cache)         # one decoding step (recurrent form)
    out = model.generate(input_ids, max_new_tokens=32)     # prompt + new tokens, [B, T + N]

Parameter names follow transformers' Qwen3-Next (``embed_tokens``, ``layers.{i}.input_layernorm``,
``layers.{i}.linear_attn`` / ``self_attn``, ``layers.{i}.mlp``, ``norm``, ``lm_head``).

Shape legend: B batch, T tokens of this call, V vocabulary, d model width, P scored positions.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from hybridattn.layers.cache import Cache
from hybridattn.layers.short_conv import check_left_padding
from hybridattn.models.block import HybridBlock, build_norm
from hybridattn.models.config import ModelConfig
from hybridattn.models.layout import format_pattern


@contextlib.contextmanager
def no_init():
    """Make torch's in-place initialisers no-ops while building shape-only (meta) modules: there they only
    cost time (their first call imports torch's decompositions, seconds), and a skeleton needs no values."""
    names = ("normal_", "uniform_", "zeros_", "ones_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


class ModelCache:
    """The caches of every layer of a model (``layers[i]`` belongs to layer ``i``), from ``model.new_cache``.

    Softmax layers hold a ``KVCache`` (a ``SlidingWindowKVCache`` where the pattern reaches a bounded distance back,
    ``PinnedWindowKVCache`` with global tokens, a ``DSACache`` for DSA), linear
    layers a ``RecurrentCache``.
    """

    def __init__(self, layers: list[Cache], layer_types: list[str]):
        self.layers = layers
        self.layer_types = layer_types

    @property
    def seen_tokens(self) -> int:
        """Tokens consumed so far (padding included)."""
        return self.layers[0].seen_tokens if self.layers else 0

    def nbytes(self) -> int:
        """Bytes of every tensor held by every layer's cache."""
        return sum(c.nbytes() for c in self.layers)

    def reset(self) -> None:
        """Empty every layer's cache (as fresh from ``model.new_cache``), keeping its buffers for reuse."""
        for c in self.layers:
            c.reset()

    def nbytes_by_type(self) -> dict[str, int]:
        """Bytes per mixer name, e.g. ``{"gated_deltanet": ..., "attention": ...}``."""
        out: dict[str, int] = {}
        for name, c in zip(self.layer_types, self.layers):
            out[name] = out.get(name, 0) + c.nbytes()
        return out


class HybridLM(nn.Module):
    """Embedding -> ``num_layers`` pre-norm blocks (mixer per ``config.layer_types``) -> RMSNorm -> lm_head.

    Args:
        config: a :class:`ModelConfig`.

    After a forward with gradients, :attr:`aux_loss` holds the weighted auxiliary losses (MoE load balancing,
    DSA indexer KL) that training adds to the language-model loss.

    Raises:
        TypeError: ``config`` is not a ``ModelConfig``.
        ValueError: a layer's mixer is not causal (named as ``layers[i]``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, received {type(config).__name__}")
        config.check_decoder_layout()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.num_layers))
        self.norm = build_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if self.embed_tokens.weight.device.type != "meta":  # meta tensors hold no values to initialise
            self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def skeleton(cls, config: ModelConfig) -> "HybridLM":
        """A shape-only model on the ``meta`` device, built without initialising anything: to count parameters
        or to receive a checkpoint with ``load_state_dict(weights, assign=True)``."""
        with torch.device("meta"), no_init():
            return cls(config)

    def reset_parameters(self) -> None:
        """Normal(0, ``initializer_range``) for every linear and embedding weight, zero biases; mixer-specific
        parameters (decay rates, norms, convs) keep their own initialisation."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def extra_repr(self) -> str:
        return f"layout={format_pattern(self.config.layer_types)!r}"

    def num_parameters(self) -> int:
        """Parameters counted once (tied embeddings count once)."""
        return sum(p.numel() for p in self.parameters())

    # -- inference state --------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, *, device=None, dtype=None) -> ModelCache:
        """Empty caches for ``batch_size`` rows, one per layer (on the model's device and dtype by default)."""
        caches = [layer.mixer.new_cache(batch_size, device=device, dtype=dtype) for layer in self.layers]
        return ModelCache(caches, self.config.layer_types)

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, cache: ModelCache | None = None,
                token_mask: torch.Tensor | None = None, logits_at: torch.Tensor | None = None):
        """Logits of the next token at every (or selected) position.

        Args:
            input_ids: ``[B, T]`` integer token ids in ``[0, V)``.
            cache: from :meth:`new_cache`; when given, the call continues the cached sequence and updates the
                cache in place (prefill with many tokens, then decode one at a time).
            token_mask: ``[B, T]`` bool, False on left padding: padded tokens change no state and are no key for
                any query; their logits are meaningless.
            logits_at: positions whose logits to compute (e.g. only the scored ones): ``[P]`` (same for every
                row; negative counts from the end) or ``[B, P]`` per row. None = every position.

        Returns:
            ``logits`` ``[B, T, V]`` (``[B, P, V]`` with ``logits_at``) when ``cache`` is None, otherwise the
            pair ``(logits, cache)``.

        Raises:
            TypeError / ValueError: non-integer or out-of-range ids, a wrong-sized mask or cache, bad positions.
        """
        b, t = self._check_ids(input_ids)
        token_mask = check_left_padding(token_mask, b, t, input_ids.device)
        if cache is not None:
            if not isinstance(cache, ModelCache) or len(cache.layers) != len(self.layers):
                raise TypeError(f"cache: expected the ModelCache of new_cache() with {len(self.layers)} layers, "
                                f"received {type(cache).__name__}")
        h = self.embed_tokens(input_ids)  # (B, T, d)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache=None if cache is None else cache.layers[i], token_mask=token_mask)
        if logits_at is not None:
            h = _select_positions(h, logits_at)  # (B, P, d)
        logits = self.lm_head(self.norm(h))
        return logits if cache is None else (logits, cache)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The auxiliary losses of the last forward, weighted, to add to the language-model loss (the trainer
        does): ``moe.router_aux_loss_coef`` x the load-balancing loss pooled over the MoE layers (as transformers'
        Qwen3-Next does) + ``indexer_aux_loss_coef`` x the sum over DSA layers of their indexer KL (each a mean
        over tokens). None when no layer has one (no MoE / DSA layer, or a DSA-only model run without gradients).
        """
        from hybridattn.layers.dsa_attention import DSAAttention
        from hybridattn.layers.moe import MoEFeedForward, pooled_load_balancing_loss

        terms = []
        balance = pooled_load_balancing_loss([m for m in self.modules() if isinstance(m, MoEFeedForward)])
        if balance is not None:
            terms.append(self.config.moe.router_aux_loss_coef * balance)
        kl = [m.aux_loss for m in self.modules() if isinstance(m, DSAAttention)]
        kl = [loss for loss in kl if loss is not None]
        if kl:
            terms.append(self.config.indexer_aux_loss_coef * torch.stack(kl).sum())
        return sum(terms[1:], terms[0]) if terms else None

    def _check_ids(self, input_ids) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected a torch.Tensor, received {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.long, torch.int):
            raise TypeError(f"input_ids: expected dtype torch.int64 or torch.int32 (what nn.Embedding takes), "
                            f"received {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected shape [B, T] with B >= 1 and T >= 1, received "
                             f"{tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids: expected ids in [0, {self.config.vocab_size}), received ids in [{lo}, {hi}]")
        return input_ids.shape[0], input_ids.shape[1]

    # -- generation and checkpoints (implemented in their own modules) ---------------------------------------
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs):
        """Sample continuations; see :func:`hybridattn.models.generation.generate`."""
        from hybridattn.models.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        """Write ``config.json`` + ``model.safetensors``; see :func:`hybridattn.models.checkpoint.save_pretrained`."""
        from hybridattn.models.checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> "HybridLM":
        """Load a saved model; see :func:`hybridattn.models.checkpoint.from_pretrained`."""
        from hybridattn.models.checkpoint import from_pretrained

        return from_pretrained(directory, **kwargs)


def _select_positions(h: torch.Tensor, positions) -> torch.Tensor:
    b, t, d = h.shape
    if (not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.long, torch.int, torch.int16,
                                                                            torch.int8, torch.uint8)
            or positions.dim() not in (1, 2)):
        got = (positions.dtype, tuple(positions.shape)) if isinstance(positions, torch.Tensor) else positions
        raise TypeError(f"logits_at: expected an integer tensor [P] or [B, P], received {got}")
    if positions.dim() == 2 and positions.shape[0] != b:
        raise ValueError(f"logits_at: expected [B={b}, P] or [P], received shape {tuple(positions.shape)}")
    if positions.numel() and (int(positions.min()) < -t or int(positions.max()) >= t):
        raise ValueError(f"logits_at: expected positions in [-{t}, {t}), received "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    idx = positions.to(h.device).long() % t
    if idx.dim() == 1:
        return h.index_select(1, idx)
    return torch.gather(h, 1, idx.unsqueeze(-1).expand(-1, -1, d))
