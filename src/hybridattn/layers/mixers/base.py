"""What every linear mixer shares: the short conv over q/k/v with its carried tail, the choice between the
chunk form (prefill, training) and the recurrent form (decoding), the hand-off of the final state to the
cache, and the rule that left padding changes no state.

A linear mixer's recurrence keeps a state ``S`` ``[B, H, Dk, Dv]``; a padded token must leave it untouched,
which every op in the family does when its key and value are zero, its log-decay is zero (no decay) and its
write strength ``beta`` is zero. ``zero_padding`` applies that rule to any number of tensors at once.

Shape legend: B batch, T time, H heads, Dk key dim, Dv value dim, C conv channels, K conv kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from hybridattn.layers.cache import RecurrentCache
from hybridattn.layers.norms import GatedRMSNorm, RMSNorm
from hybridattn.layers.short_conv import ShortConvolution, check_left_padding
from hybridattn.ops._checks import check_heads_divisible, check_positive_int, check_tensor


def zero_padding(token_mask: torch.Tensor | None, *tensors: torch.Tensor):
    """Zero each tensor ``[B, T, ...]`` at padded positions (``token_mask`` False); identity when None."""
    if token_mask is None:
        return tensors if len(tensors) > 1 else tensors[0]
    out = []
    for x in tensors:
        m = token_mask.view(*token_mask.shape, *([1] * (x.dim() - 2)))
        out.append(x * m.to(x.dtype))
    return tuple(out) if len(out) > 1 else out[0]


def on_meta(t: torch.Tensor) -> bool:
    """True for shape-only tensors (the memory planner builds layers on the ``meta`` device); initialisers skip
    them because computing values there imports torch's compiler stack, seconds for nothing."""
    return t.device.type == "meta"


@torch.no_grad()
def log_uniform_(param: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``param <- log(U(low, high))`` in place (the ``A_log`` init of Mamba2 and Gated DeltaNet)."""
    if not on_meta(param):
        param.uniform_(low, high).log_()
    return param


@torch.no_grad()
def dt_bias_(param: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 1e-1) -> torch.Tensor:
    """``param <- softplus^-1(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]`` (Mamba's from-scratch init,
    fla's for Gated DeltaNet): at the start ``softplus(dt_bias) = dt`` is small, so every head decays slowly and
    remembers across the sequence. Why not a constant: ``dt_bias = 1`` gives ``softplus(1) = 1.3``, and with
    ``A`` up to 16 most heads forget nearly all of their state at every token; a large-state model then stays at
    chance on recall tasks (measured: MQAR, docs/benchmarks.md, arena)."""
    if not on_meta(param):
        dt = torch.empty_like(param, dtype=torch.float64).uniform_(math.log(dt_min), math.log(dt_max)).exp()
        param.copy_(dt + torch.log(-torch.expm1(-dt)))
    return param


class LinearMixer(nn.Module):
    """Base of the linear mixers. Subclasses set ``d_model``, ``state_heads``, ``state_k_dim``, ``state_v_dim``,
    ``chunk_size`` and optionally ``conv1d`` (a :class:`ShortConvolution`, or None), then implement
    ``forward(x, *, cache=None, token_mask=None)`` with :meth:`_begin`, :meth:`_short_conv` and :meth:`_mix`.
    """

    conv1d: ShortConvolution | None

    def _init_sizes(self, d_model: int, num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                    chunk_size: int) -> None:
        """Validate and store the head sizes (Hk key heads, Hv value heads, a multiple of Hk)."""
        self.d_model = check_positive_int("d_model", d_model)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.num_v_heads = check_positive_int("num_v_heads", num_v_heads)
        check_heads_divisible("num_v_heads", num_v_heads, "num_heads", num_heads)
        self.head_k_dim = check_positive_int("head_k_dim", head_k_dim)
        self.head_v_dim = check_positive_int("head_v_dim", head_v_dim)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.key_dim, self.value_dim = num_heads * head_k_dim, num_v_heads * head_v_dim
        self.state_heads, self.state_k_dim, self.state_v_dim = num_v_heads, head_k_dim, head_v_dim

    def new_cache(self, batch_size: int, *, device=None, dtype=None) -> RecurrentCache:
        """An empty cache: zero state ``[B, H, Dk, Dv]`` (float32, or float64 for a float64 model) and a zero
        conv tail ``[B, K - 1, C]`` (model dtype)."""
        ref = next(self.parameters())
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        state = torch.zeros(batch_size, self.state_heads, self.state_k_dim, self.state_v_dim,
                            device=device, dtype=state_dtype)
        tail = None if self.conv1d is None else self.conv1d.new_tail(batch_size, device=device, dtype=dtype)
        return RecurrentCache(state, tail)

    def _begin(self, x: torch.Tensor, cache, token_mask):
        """Validate the call; returns the token mask, or None when every token is real."""
        check_tensor("x", x, ndim=3)
        b, t, d = x.shape
        if d != self.d_model:
            raise ValueError(f"x: expected [B, T, d_model={self.d_model}], received shape {tuple(x.shape)}")
        if cache is not None:
            if not isinstance(cache, RecurrentCache):
                raise TypeError(f"cache: expected a RecurrentCache (from new_cache), received {type(cache).__name__}")
            if cache.state.shape[0] != b:
                raise ValueError(f"cache: expected batch size {b} (the batch of x), received {cache.state.shape[0]}")
        return check_left_padding(token_mask, b, t, x.device)

    def _short_conv(self, x: torch.Tensor, cache, token_mask) -> torch.Tensor:
        """The short conv + SiLU over ``x`` ``[B, T, C]``, continuing and updating the cache's tail; SiLU
        alone when the mixer has no conv."""
        if self.conv1d is None:
            return zero_padding(token_mask, torch.nn.functional.silu(x))
        y, tail = self.conv1d(x, tail=None if cache is None else cache.conv_tail, token_mask=token_mask)
        if cache is not None:
            cache.conv_tail = tail
        return y

    def _mix(self, op, *args, cache, token_mask, **kwargs) -> torch.Tensor:
        """Run ``op(*args, initial_state=..., output_final_state=..., mode=..., **kwargs)``: the chunk form for
        a multi-token call, the recurrent form for one token, continuing from and storing into ``cache``."""
        t = args[0].shape[1]
        mode = "recurrent" if t == 1 else "chunk"
        chunk = {} if mode == "recurrent" else {"chunk_size": self.chunk_size}
        initial = None if cache is None or cache.seen_tokens == 0 else cache.state
        o, final = op(*args, initial_state=initial, output_final_state=cache is not None, mode=mode,
                      **chunk, **kwargs)
        if cache is not None:
            cache.advance(final, t, token_mask)
        return o


class QKVMixer(LinearMixer):
    """A linear mixer with separate ``q_proj`` / ``k_proj`` / ``v_proj``, a short conv over their
    concatenation, a per-head output norm and ``o_proj`` (the fla layout of DeltaNet, GLA, RetNet, linear
    attention). With ``output_gate`` the norm is gated: ``rmsnorm(o) * silu(g_proj x)``.

    Args:
        d_model: model width.
        num_heads: Hk query/key heads.
        num_v_heads: Hv value heads (a multiple of Hk).
        head_k_dim, head_v_dim: Dk, Dv.
        conv_size: short-conv kernel (0 = SiLU only).
        chunk_size: chunk length of the prefill form.
        output_gate: gate the output norm with ``silu(g_proj x)``.
        norm_eps: epsilon of the output norm.
    """

    def __init__(self, d_model: int, *, num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                 conv_size: int = 4, chunk_size: int = 64, output_gate: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self._init_sizes(d_model, num_heads, num_v_heads, head_k_dim, head_v_dim, chunk_size)
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.conv1d = ShortConvolution(2 * self.key_dim + self.value_dim, conv_size) if conv_size else None
        if output_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(head_v_dim, eps=norm_eps)
        else:
            self.g_proj, self.o_norm = None, RMSNorm(head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def qkv(self, x: torch.Tensor, cache, token_mask):
        """q, k ``[B, T, Hk, Dk]`` and v ``[B, T, Hv, Dv]`` after the short conv (zero at padding)."""
        b, t, _ = x.shape
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = self._short_conv(qkv, cache, token_mask)
        q, k, v = torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (q.reshape(b, t, self.num_heads, self.head_k_dim), k.reshape(b, t, self.num_heads, self.head_k_dim),
                v.reshape(b, t, self.num_v_heads, self.head_v_dim))

    def output(self, o: torch.Tensor, x: torch.Tensor, token_mask) -> torch.Tensor:
        """Norm (gated by ``x`` with ``output_gate``) and ``o_proj`` of the mixed heads ``[B, T, Hv, Dv]``
        -> ``[B, T, d_model]`` (zero at padding)."""
        if self.g_proj is None:
            o = self.o_norm(o)
        else:
            o = self.o_norm(o, self.g_proj(x).view(o.shape))
        return zero_padding(token_mask, self.o_proj(o.reshape(*o.shape[:2], self.value_dim)))


def linear_config_sizes(config) -> dict:
    """The keyword sizes of a :class:`QKVMixer` from a ``ModelConfig``'s ``linear`` section."""
    lin = config.linear
    return dict(num_heads=lin.num_heads, num_v_heads=lin.v_heads(), head_k_dim=lin.k_dim(config.d_model),
                head_v_dim=lin.v_dim(config.d_model), conv_size=lin.conv_size, chunk_size=lin.chunk_size)
