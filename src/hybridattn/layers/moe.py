"""Sparse mixture-of-experts feed-forward (Qwen3-Next / Qwen2-MoE style), with its naive reference.

Each token ``x`` is routed by a softmax router to ``top_k`` of ``E`` SwiGLU experts; a shared expert, scaled by its
own sigmoid gate, sees every token::

    p      = softmax(W_r x)                                   # [E], computed in float32
    S, w   = top_k(p)                                          # experts and their probabilities
    w      = w / sum(w)            (if norm_topk_prob)
    y      = sum_{e in S} w_e * down_e(silu(gate_e x) * up_e x) + sigmoid(w_s . x) * shared(x)

The fast path sorts the ``N * top_k`` (token, expert) assignments by expert and runs one batched SwiGLU per expert
over exactly its tokens, so the work is ``top_k`` expert evaluations per token, never ``E``.

The auxiliary load-balancing loss is the Switch-Transformer loss ``E * sum_e f_e * P_e`` (``f_e``: share of top-k
assignments that went to expert ``e``, per token; ``P_e``: mean router probability of ``e``), as transformers'
``load_balancing_loss_func`` computes it. After each forward the module keeps ``router_logits`` and ``aux_loss``.

Shape legend: ``B`` batch, ``T`` time, ``N`` tokens (``B * T``), ``d`` model width, ``E`` experts, ``k`` top-k,
``I`` expert hidden width.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybridattn.ops import _native
from hybridattn.ops._checks import check_choice, check_positive_int, check_shape, check_tensor

# Up to this many tokens the compiled matrix-vector path runs (decoding); beyond, the grouped GEMMs below win.
_NATIVE_MAX_TOKENS = 8

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class SwiGLU(nn.Module):
    """Gated feed-forward ``down(act(gate(x)) * up(x))`` with the transformers parameter names
    (``gate_proj``, ``up_proj``, ``down_proj``) so checkpoints map one to one.

    Args:
        d_model: input and output width ``d``.
        hidden: inner width ``I``.
        activation: ``"silu"`` (SwiGLU), ``"gelu"`` or ``"gelu_tanh"`` (GeGLU).
    """

    def __init__(self, d_model: int, hidden: int, *, activation: str = "silu") -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("hidden", hidden)
        check_choice("activation", activation, _ACTIVATIONS)
        self.activation = activation
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))


def load_balancing_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], top_k: int, *,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e``, pooled over layers as transformers does.

    Args:
        router_logits: ``[N, E]`` router logits of one layer, or a sequence of them (one per MoE layer); the
            assignment shares and mean probabilities are pooled over all layers before the product.
        top_k: experts per token.
        token_mask: optional bool ``[N]`` (or ``[B, T]`` flattening to ``N``); False rows (padding) do not count.

    Returns:
        A scalar tensor (float32), differentiable through the router probabilities.

    Raises:
        ValueError: empty sequence, mismatched shapes, ``top_k`` out of range.
    """
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    if not layers:
        raise ValueError("router_logits: expected at least one [N, E] tensor, received an empty sequence")
    for i, logits in enumerate(layers):
        check_tensor(f"router_logits[{i}]", logits, ndim=2)
        check_shape(f"router_logits[{i}]", logits, layers[0].shape)
    n, num_experts = layers[0].shape
    check_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k: expected at most the {num_experts} experts, received {top_k}")
    weight = torch.ones(n, device=layers[0].device, dtype=torch.float32)
    if token_mask is not None:
        if token_mask.dtype != torch.bool or token_mask.numel() != n:
            raise ValueError(f"token_mask: expected a bool tensor with {n} elements, received "
                             f"{token_mask.dtype} {tuple(token_mask.shape)}")
        weight = token_mask.reshape(n).to(torch.float32)
    assigned = torch.zeros(num_experts, device=weight.device, dtype=torch.float32)
    prob_sum = torch.zeros(num_experts, device=weight.device, dtype=torch.float32)
    for logits in layers:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        assigned = assigned.scatter_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * weight[:, None]).sum(0)
    rows = weight.sum() * len(layers)
    return num_experts * ((assigned / rows) * (prob_sum / rows)).sum()


def pooled_load_balancing_loss(layers: Sequence["MoEFeedForward"]) -> torch.Tensor | None:
    """The load-balancing loss of several MoE layers' last forwards pooled into one, as transformers'
    ``load_balancing_loss_func`` pools a model's layers (the padding mask of the first layer that ran applies:
    in one model every layer sees the same tokens). None when no layer has run."""
    ran = [m for m in layers if m.router_logits is not None]
    if not ran:
        return None
    return load_balancing_loss([m.router_logits for m in ran], ran[0].top_k, token_mask=ran[0]._aux_mask)


class MoEFeedForward(nn.Module):
    """Sparse mixture-of-experts SwiGLU feed-forward with an optional gated shared expert.

    Parameter layout follows transformers' Qwen3-Next (``gate.weight`` router, ``experts.gate_up_proj``
    ``[E, 2I, d]`` with the gate rows first, ``experts.down_proj`` ``[E, d, I]``, ``shared_expert``,
    ``shared_expert_gate``) but is plain tensors here: ``router``, ``gate_up_proj``, ``down_proj``.

    Args:
        d_model: model width ``d``.
        num_experts: ``E``.
        top_k: experts per token ``k`` (``1 <= k <= E``).
        expert_hidden: inner width ``I`` of each routed expert.
        shared_expert_hidden: inner width of the shared expert; 0 for none.
        norm_topk_prob: renormalise the chosen top-k probabilities to sum to 1.
        activation: expert activation (``"silu"`` gives SwiGLU).

    Raises:
        ValueError / TypeError: a size is not a positive int, ``top_k > num_experts``, unknown activation.
    """

    def __init__(self, d_model: int, *, num_experts: int, top_k: int, expert_hidden: int,
                 shared_expert_hidden: int = 0, norm_topk_prob: bool = True, activation: str = "silu") -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("num_experts", num_experts)
        check_positive_int("top_k", top_k)
        check_positive_int("expert_hidden", expert_hidden)
        check_positive_int("shared_expert_hidden", shared_expert_hidden, allow_zero=True)
        check_choice("activation", activation, _ACTIVATIONS)
        if top_k > num_experts:
            raise ValueError(f"top_k: expected at most num_experts={num_experts}, received {top_k}")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.expert_hidden, self.norm_topk_prob, self.activation = expert_hidden, norm_topk_prob, activation
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, expert_hidden))
        if shared_expert_hidden:
            self.shared_expert = SwiGLU(d_model, shared_expert_hidden, activation=activation)
            self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)
        else:
            self.shared_expert, self.shared_expert_gate = None, None
        self.router_logits: torch.Tensor | None = None
        self._aux_mask: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits ``[N, E]``, top-k weights ``[N, k]`` (in ``x``'s dtype) and expert ids ``[N, k]``."""
        logits = self.router(x)
        # Softmax in at least float32 even for half inputs: the top-k choice must not flip on rounding.
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor, *, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: ``[..., d]`` (typically ``[B, T, d]``).
            token_mask: optional bool of shape ``x.shape[:-1]``; False (padding) tokens are left out of
                ``aux_loss`` (their outputs are computed anyway and are meaningless).

        Returns:
            ``[..., d]``, same dtype as ``x``. Keeps ``self.router_logits`` ``[N, E]`` for ``self.aux_loss``.

        Raises:
            ValueError / TypeError: wrong last dimension, non-floating ``x``, bad ``token_mask``.
        """
        check_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last dimension d_model={self.d_model}, received shape {tuple(x.shape)}")
        if token_mask is not None:
            check_tensor("token_mask", token_mask, floating=False)
            check_shape("token_mask", token_mask, x.shape[:-1])
        flat = x.reshape(-1, self.d_model)  # (N, d)
        if flat.shape[0] <= _NATIVE_MAX_TOKENS and self._can_run_natively(flat):
            out, logits = self._native_forward(flat)
            self.router_logits, self._aux_mask = logits, token_mask
            return out.reshape(x.shape)
        logits, weights, experts = self.route(flat)
        out = self._experts(flat, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        self.router_logits, self._aux_mask = logits, token_mask
        return out.reshape(x.shape)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """Load-balancing loss of the last forward (computed on demand, so inference does not pay for it)."""
        if self.router_logits is None:
            return None
        return load_balancing_loss(self.router_logits, self.top_k, token_mask=self._aux_mask)

    def _can_run_natively(self, flat: torch.Tensor) -> bool:
        """The compiled few-token path (``ops/csrc/moe_decode.cpp``): inference, SwiGLU, one float dtype."""
        if self.activation != "silu" or (torch.is_grad_enabled() and (
                flat.requires_grad or any(p.requires_grad for p in self.parameters()))):
            return False
        return _native.usable(flat, self.router.weight, self.gate_up_proj, self.down_proj) and (
            _native.native_ops("moe_decode") is not None)

    def _native_forward(self, flat: torch.Tensor):
        s = self.shared_expert
        shared = (None,) * 4 if s is None else (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight,
                                                self.shared_expert_gate.weight)
        out, logits = _native.native_ops("moe_decode").moe_decode(
            flat.contiguous(), self.router.weight, self.gate_up_proj, self.down_proj, self.top_k, self.norm_topk_prob,
            *shared)
        return out, logits

    def _experts(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        n, k = experts.shape
        out = flat.new_zeros(flat.shape)
        act = _ACTIVATIONS[self.activation]
        if n == 1:
            # One token (decoding): its k experts directly, without the sort/scatter machinery.
            for w, e in zip(weights[0], experts[0].tolist()):
                gate, up = F.linear(flat, self.gate_up_proj[e]).chunk(2, dim=-1)
                out = out + F.linear(act(gate) * up * w, self.down_proj[e])
            return out
        flat_experts = experts.reshape(-1)  # (N*k,)
        order = flat_experts.argsort(stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        token_of = order // k  # token of each sorted assignment
        tokens = flat.index_select(0, token_of)  # (N*k, d), grouped by expert
        sorted_weights = weights.reshape(-1, 1).index_select(0, order)  # (N*k, 1)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            gate, up = F.linear(tokens[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            # The routing weight scales the I-wide hidden rather than the d-wide output: fewer multiplies when I < d.
            hidden = act(gate) * up * sorted_weights[rows]
            out.index_add_(0, token_of[rows], F.linear(hidden, self.down_proj[e]))  # in place: no N x d copy
            start += count
        return out


def naive_moe(module: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference of ``MoEFeedForward.forward`` (use float64 inputs and weights): routes each
    token on its own and evaluates its chosen experts one by one.

    Args:
        module: the layer whose weights to use (cast them with ``module.double()`` for a float64 reference).
        x: ``[..., d]``.

    Returns:
        ``[..., d]``.
    """
    act = _ACTIVATIONS[module.activation]
    flat = x.reshape(-1, module.d_model)
    rows = []
    for token in flat:
        probs = torch.softmax(module.router.weight @ token, dim=-1)
        weights, experts = probs.topk(module.top_k)
        if module.norm_topk_prob:
            weights = weights / weights.sum()
        y = torch.zeros_like(token)
        for w, e in zip(weights, experts.tolist()):
            gate, up = (module.gate_up_proj[e] @ token).chunk(2)
            y = y + w * (module.down_proj[e] @ (act(gate) * up))
        if module.shared_expert is not None:
            s = module.shared_expert
            shared = s.down_proj.weight @ (act(s.gate_proj.weight @ token) * (s.up_proj.weight @ token))
            y = y + torch.sigmoid(module.shared_expert_gate.weight[0] @ token) * shared
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)
