"""Softmax attention: one public entry point, four backends.

    o[b, i, h] = sum_j softmax_j(s[b, h, i, :]) v[b, j, h // G]
    s[b, h, i, j] = cap * tanh(scale * q[b, i, h] . k[b, j, h // G] / cap) + bias[b, h, i, j]   (masked: -inf)

with ``G = Hq / Hkv`` query heads per key/value head (GQA/MQA; query head ``h`` reads key/value head ``h // G``,
as flash-attn and SDPA's ``enable_gqa`` do). The softcap (Gemma 2) applies to the scaled logits before the bias is
added; without ``softcap`` the tanh is skipped. A query row whose keys are all masked returns zeros, not NaN, and
gets zero gradients.

Backends (``backend=``):

- ``naive``: the reference; materialises the ``Tq x Tk`` matrix, works in float64, returns the weights.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; a mask spec or bias is expanded to a dense
  tensor only when one is needed (plain causal with ``Tq == Tk`` uses ``is_causal``). No softcap.
- ``tiled``: flash-style online softmax in pure torch (``hybridattn.ops.tiled_attention``), memory
  ``O(T * block)``, skips blocks the mask empties, any mask / bias / softcap, recomputing backward.
- ``flex``: FlexAttention through ``torch.compile`` (``spec.mask_mod`` / ``bias.score_mod``); on the CPU it is
  inference-only.
- ``auto``, in order:

  1. SDPA when it needs no dense mask (none, or causal with ``Tq == Tk``) and no softcap, and either the
     ``B * Hq * Tq * Tk`` matrix is at most ``DENSE_LIMIT`` or SDPA runs a fused kernel (no ``Tq x Tk`` buffer);
  2. ``block_sparse`` for a sparse mask spec (no bias / softcap) that ``prefers_block_sparse`` accepts (closed
     form, at most half of its tiles kept): above ``DENSE_LIMIT`` against ``tiled`` (judged on 128 x 128 tiles),
     and below it from ``max(Tq, Tk) >= 256`` on (judged on the kernel's own tiles), where skipping the emptied
     tiles beats SDPA over the dense mask (measured: ``python -m hybridattn.bench.auto_policy``, table in
     ``docs/benchmarks.md``);
  3. at most ``DENSE_LIMIT``: ``naive`` with a softcap or a half-precision bias, else SDPA with a dense mask;
  4. else ``tiled``.

  It never builds a ``Tq x Tk`` tensor above ``DENSE_LIMIT`` elements and never picks ``flex`` (compilation
  costs more than it saves for one call).

Shape legend: B batch, Tq / Tk query / key length, Hq / Hkv query / key-value heads, D head dim of q and k,
Dv head dim of v.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from hybridattn.ops._checks import check_choice, check_number, check_qkv, check_scale
from hybridattn.ops.masks import Causal, MaskSpec, as_mask_spec
from hybridattn.ops.scores import ScoreBias, as_score_bias

__all__ = ["BACKENDS", "DENSE_LIMIT", "softmax_attention"]

#: Largest ``B * Hq * Tq * Tk`` that ``auto`` lets a backend materialise (64 MiB of fp32 per copy).
DENSE_LIMIT = 2**24


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16 / fp16 inputs accumulate in fp32; fp32 and fp64 keep their own precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_spec_dims(name: str, spec, batch: int, heads: int) -> None:
    """A mask spec or score bias must depend on q's batch / heads or on none (``None``)."""
    if spec.batch_size not in (None, batch):
        raise ValueError(f"{name}: expected batch size {batch} (the batch of q) or 1, received {spec.batch_size}")
    if spec.num_heads not in (None, heads):
        raise ValueError(f"{name}: expected {heads} heads (the heads of q) or 1, received {spec.num_heads}")


def dense_scores(q, k, *, mask: MaskSpec | None, bias: ScoreBias | None, scale: float, softcap: float | None):
    """Masked logits ``[B, Hq, Tq, Tk]`` in the accumulation dtype, plus the boolean keep mask (or None).

    Shared by the naive reference and the attention-sink variant; ``finish_scores`` keeps the order of softcap,
    bias and mask the same for every form."""
    b, tq, hq, _ = q.shape
    hkv = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qh = q.to(acc).transpose(1, 2)  # (B, Hq, Tq, D)
    kh = k.to(acc).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)  # (B, Hq, Tk, D)
    s = scale * (qh @ kh.transpose(-1, -2))
    return finish_scores(s, mask=mask, bias=bias, softcap=softcap)


def finish_scores(s, *, mask: MaskSpec | None, bias: ScoreBias | None, softcap: float | None):
    """Apply softcap, bias and mask (in that order) to raw logits ``s`` ``[B, H, Tq, Tk]``."""
    tq, tk = s.shape[-2:]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.dense(tq, tk, device=s.device, dtype=s.dtype)
    keep = None
    if mask is not None:
        keep = mask.dense(tq, tk, device=s.device)
        s = s.masked_fill(~keep, float("-inf"))
    return s, keep


def safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where a row of only ``-inf`` gives zeros (and zero gradients), not NaN."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


def naive_attention(q, k, v, *, mask, bias, scale, softcap, return_weights=False):
    """Reference: materialise the logits, softmax, weighted sum; float64-capable.

    Returns ``o`` ``[B, Tq, Hq, Dv]`` in q's dtype (and the weights ``[B, Hq, Tq, Tk]`` in the accumulation dtype
    when ``return_weights``)."""
    s, _ = dense_scores(q, k, mask=mask, bias=bias, scale=scale, softcap=softcap)
    w = safe_softmax(s)
    o = weighted_values(w, v).to(q.dtype)
    return (o, w) if return_weights else o


def weighted_values(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_j w[b, h, i, j] v[b, j, h // G]``: weights ``[B, Hq, Tq, Tk]``, v ``[B, Tk, Hkv, Dv]`` ->
    ``[B, Tq, Hq, Dv]`` in the weights' dtype."""
    vh = v.to(w.dtype).transpose(1, 2).repeat_interleave(w.shape[1] // v.shape[2], dim=1)  # (B, Hq, Tk, Dv)
    return (w @ vh).transpose(1, 2)


def sdpa_attention(q, k, v, *, mask, bias, scale, softcap):
    """torch SDPA. Plain causal with ``Tq == Tk`` uses ``is_causal`` (top-left aligned, which equals bottom-right
    only for square masks); anything else is expanded to a dense boolean mask or additive float mask."""
    if softcap is not None:
        raise ValueError("softcap: the sdpa backend cannot apply a logit softcap; use backend='tiled' or 'naive'")
    tq, tk = q.shape[1], k.shape[1]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    gqa = q.shape[2] != k.shape[2]
    if scale <= 0:
        # SDPA's fused CPU kernels return NaN for a causal call with a scale <= 0 (their running maximum assumes a
        # positive one); scaling q first is the same product
        qh, scale = qh * scale, 1.0
    if bias is None and (mask is None or (type(mask) is Causal and tq == tk)):
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=mask is not None, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2)
    attn_mask, row_kept = None, None
    if mask is not None:
        keep = mask.dense(tq, tk, device=q.device)
        row_kept = keep.any(dim=-1, keepdim=True)
        # A fully masked row would make SDPA's softmax 0/0; let it attend freely and zero its output below, so
        # that neither the output nor its gradients see a NaN.
        attn_mask = keep | ~row_kept
    if bias is not None:
        additive = bias.dense(tq, tk, device=q.device, dtype=q.dtype)
        if attn_mask is not None:
            additive = additive.masked_fill(~attn_mask, float("-inf"))
        attn_mask = additive
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    if row_kept is not None and not bool(row_kept.all()):
        o = torch.where(row_kept, o, torch.zeros((), dtype=o.dtype, device=o.device))
    return o.transpose(1, 2)


def _tiled(q, k, v, *, mask, bias, scale, softcap):
    from hybridattn.ops.tiled_attention import tiled_attention

    return tiled_attention(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap)


def _flex(q, k, v, *, mask, bias, scale, softcap):
    from hybridattn.ops.flex_backend import flex_attention_backend

    return flex_attention_backend(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap)


#: Backend registry: name -> fn(q, k, v, *, mask, bias, scale, softcap) on validated, normalised arguments.
BACKENDS: dict[str, Callable] = {"naive": naive_attention, "sdpa": sdpa_attention, "tiled": _tiled, "flex": _flex}


def _sdpa_is_fused(q, k, v, causal: bool) -> bool:
    """Whether SDPA would run a fused (memory-efficient) kernel rather than the math fallback, which builds
    ``Tq x Tk`` (on the CPU it does so, e.g., when ``Dv != D``)."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    try:
        return torch._fused_sdp_choice(qh, kh, vh, None, 0.0, causal, enable_gqa=q.shape[2] != k.shape[2]) != 0
    except (AttributeError, RuntimeError, TypeError):  # private API: fall back to the known CPU condition
        return q.shape[-1] == v.shape[-1]


def choose_backend(q, k, v=None, *, mask, bias, softcap) -> str:
    """The backend ``auto`` runs for these (validated) arguments; see the module docstring for the policy.
    ``v`` defaults to a stand-in shaped like ``k``."""
    b, tq, hq, _ = q.shape
    tk = k.shape[1]
    small = b * hq * tq * tk <= DENSE_LIMIT
    needs_dense = bias is not None or (mask is not None and not (type(mask) is Causal and tq == tk))
    if softcap is None and not needs_dense and (small or _sdpa_is_fused(q, k, k if v is None else v, mask is not None)):
        return "sdpa"
    if bias is None and softcap is None and "block_sparse" in BACKENDS:
        # Sparse specs (windows, BigBird, ...) run fastest on the block-sparse kernel, which registers
        # itself as the "block_sparse" backend when hybridattn.ops is imported. Below DENSE_LIMIT SDPA with a dense
        # mask computes every tile yet wins on short sequences (one fused call): a measured crossover.
        from hybridattn.ops.block_sparse_attention import prefers_block_sparse

        if prefers_block_sparse(mask, tq, tk, rival="sdpa" if small else "tiled"):
            return "block_sparse"
    if small:
        # SDPA takes an additive mask only in q's dtype; half-precision biases would lose precision there.
        half_bias = bias is not None and q.dtype in (torch.float16, torch.bfloat16)
        return "naive" if softcap is not None or half_bias else "sdpa"
    return "tiled"


def softmax_attention(q, k, v, *, causal: bool = False, mask=None, bias=None, scale: float | None = None,
                      softcap: float | None = None, backend: str = "auto", return_weights: bool = False):
    """Scaled dot-product softmax attention with GQA, cross-attention, masks, biases and softcap.

    Args:
        q: queries ``[B, Tq, Hq, D]``.
        k: keys ``[B, Tk, Hkv, D]`` with ``Hq % Hkv == 0``.
        v: values ``[B, Tk, Hkv, Dv]``.
        causal: query ``i`` sees keys ``j <= i + Tk - Tq`` (bottom-right aligned as in flash-attn); combined with
            ``mask`` by AND.
        mask: a ``MaskSpec`` from ``hybridattn.ops.masks`` (``causal()``, ``padding(lengths)``,
            ``document(cu_seqlens)``, ``prefix_lm(n)``, combined with ``&`` / ``|``) or a bool tensor of 2 to 4
            dimensions broadcastable to ``[B, Hq, Tq, Tk]`` (True = attend).
        bias: additive logits, a ``ScoreBias`` (e.g. ALiBi) or a float tensor of 2 to 4 dimensions broadcastable
            to ``[B, Hq, Tq, Tk]``.
        scale: logit scale; default ``1 / sqrt(D)``.
        softcap: if given, logits become ``softcap * tanh(logits / softcap)`` before the bias (Gemma 2).
        backend: ``"auto"``, ``"naive"``, ``"sdpa"``, ``"tiled"`` or ``"flex"``.
        return_weights: also return the attention weights (``naive`` backend only; ``auto`` switches to it).

    Returns:
        ``o`` ``[B, Tq, Hq, Dv]`` in q's dtype, or ``(o, weights)`` with weights ``[B, Hq, Tq, Tk]``.

    Raises:
        TypeError: a non-tensor or non-floating input, dtype mismatch, a mask / bias of the wrong type.
        ValueError: mismatched shapes or devices, ``Hq % Hkv != 0``, a mask / bias that does not broadcast, an
            unknown backend, or an option the chosen backend cannot honour.
    """
    b, tq, hq, d, tk, hkv, dv = check_qkv(q, k, v)
    check_choice("backend", backend, ("auto", *BACKENDS))
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, received {type(causal).__name__}")
    scale = check_scale(scale, d)
    softcap = None if softcap is None else check_number("softcap", softcap, positive=True)

    spec = None if mask is None else as_mask_spec(mask, "mask")
    if causal:
        spec = Causal() if spec is None else Causal() & spec
    if spec is not None:
        check_spec_dims("mask", spec, b, hq)
        spec.mask_mod(tq, tk)  # validates lengths / cu_seqlens / tensor shape against this call
        if type(spec) is Causal and tq == 1:
            spec = None  # one query aligned bottom-right sees every key (decoding)
    score_bias = None if bias is None else as_score_bias(bias, "bias")
    if score_bias is not None:
        check_spec_dims("bias", score_bias, b, hq)
        if tq and tk:
            probe = torch.zeros(1, dtype=torch.long, device=q.device)
            got = score_bias.block(tq, tk, probe, probe)
            if got.dim() != 4 or got.shape[-2:] != (1, 1):
                raise ValueError(f"bias: block() must return [B|1, H|1, len(q_idx), len(kv_idx)], "
                                 f"received {tuple(got.shape)}")

    if return_weights and backend not in ("auto", "naive"):
        raise ValueError(f"return_weights: only the naive backend returns weights, received backend={backend!r}")
    if backend == "auto":
        backend = "naive" if return_weights else choose_backend(q, k, v, mask=spec, bias=score_bias, softcap=softcap)

    if b == 0 or tq == 0 or tk == 0:
        # Nothing to attend (no row, no query or no key): a fully masked row's output is zeros, and so are the
        # gradients; an empty batch is an empty output.
        o = q.new_zeros(b, tq, hq, dv) + 0 * (q.sum() + k.sum() + v.sum())
        return (o, q.new_zeros(b, hq, tq, tk, dtype=accumulation_dtype(q.dtype))) if return_weights else o
    kwargs = dict(mask=spec, bias=score_bias, scale=scale, softcap=softcap)
    poison = None
    if spec is not None and not bool(torch.isfinite(k.sum() + v.sum())):
        k, v, poison = _unread_nonfinite(k, v, spec, hq)
    if return_weights:
        o, w = naive_attention(q, k, v, return_weights=True, **kwargs)
        return (o if poison is None else poison(o)), w
    o = BACKENDS[backend](q, k, v, **kwargs)
    return o if poison is None else poison(o)


def _unread_nonfinite(k, v, spec: MaskSpec, hq: int):
    """Masked means not read, NaN included. Every backend multiplies masked weights (exact zeros) into values in
    a dense product, and ``0 * nan`` is NaN, so a non-finite key or value at a masked position (padding, the
    future) would reach rows that never see it. Called only when some key or value is not finite (one summed
    check per call, a conservative test): zero the non-finite entries, run the backend, then set to NaN exactly
    what the math reads: every output of a row that keeps a non-finite key, and column ``d`` of a row that keeps
    a value non-finite in ``d``. Returns ``(k, v, poison)`` with ``poison(o) -> o``."""
    b, _, hkv, dv = v.shape
    bad_k = ~torch.isfinite(k).all(-1)                         # (B, Tk, Hkv)
    bad_v = ~torch.isfinite(v)                                 # (B, Tk, Hkv, Dv)
    k = torch.where(torch.isfinite(k), k, torch.zeros((), dtype=k.dtype, device=k.device))
    v = torch.where(bad_v, torch.zeros((), dtype=v.dtype, device=v.device), v)
    # per key and head: which value columns a row that keeps this key reads as NaN (all of them for a bad key)
    bad = (bad_v | bad_k[..., None]).to(torch.float32).transpose(1, 2)   # (B, Hkv, Tk, Dv)
    bad = bad.repeat_interleave(hq // hkv, dim=1)                        # (B, Hq, Tk, Dv)
    tk = k.shape[1]

    def poison(o):
        tq = o.shape[1]
        seen = torch.empty(b, hq, tq, dv, dtype=torch.bool, device=o.device)
        step = max(1, 2**22 // max(1, tk))  # rows per block: a few MiB of dense mask at a time
        for r0 in range(0, tq, step):
            r1 = min(tq, r0 + step)
            keep = spec.dense_rows(tq, tk, r0, r1, device=o.device).to(torch.float32)  # (B|1, H|1, rows, Tk)
            seen[:, :, r0:r1] = (keep @ bad) > 0
        return torch.where(seen.transpose(1, 2), torch.full((), float("nan"), dtype=o.dtype, device=o.device), o)

    return k, v, poison
