"""How many key-value pairs one layer's memory holds: write N pairs, read every key back, count the values
recovered. No training, seconds on a CPU: the seeds' "blurry state" made visible.

Each memory runs through the library's own op as one sequence of ``2N`` tokens: N writes (key ``k_i``, value
``v_i``), then N reads (query ``k_j``, no key, no value, no decay), so the read of ``k_j`` sees the state every
write left behind. A read recalls pair ``j`` when the value it returns is closer (cosine) to ``v_j`` than to any
other stored value and to each of 256 other random values (the rest of a vocabulary). Values are random Gaussian
vectors. Keys are unit vectors spread as well as ``Dk`` dimensions allow (``keys="frame"``: orthonormal while
``N <= Dk``, a tight frame beyond, the best a trained model can learn) or drawn at random (``keys="random"``).

- ``delta rule``: ``S <- S + k (v - S^T k)^T`` (beta 1); ``linear attention``: ``S <- S + k v^T``. A state of
  ``Dk x Dv`` stores at most Dk independent associations exactly: with orthonormal keys both recall every pair up
  to ``N = Dk`` (the capacity line), and beyond it each read returns a blur of several values.
- ``gated`` variants: the same with a per-token decay ``exp(g)``: older pairs fade.
- ``softmax``: attention over the N stored keys (scale ``sqrt(Dk)`` x ``sharpness``), the model of a KV cache: no
  fixed state, recall stays near 1 far beyond Dk.

Shape legend: N pairs, Dk key dim, Dv value dim.
"""

from __future__ import annotations

import math

import torch

from hybridattn.ops import gated_delta_rule, simple_gla, softmax_attention

#: memory name -> (op kind, log-decay per write): the panels of :func:`capacity_curves`
MEMORIES = {
    "delta rule": ("delta", None),
    "gated delta rule (decay 0.98)": ("delta", math.log(0.98)),
    "linear attention": ("linear", None),
    "gated linear attention (decay 0.98)": ("linear", math.log(0.98)),
    "softmax over the N keys": ("softmax", None),
}


def _pairs(n: int, dk: int, dv: int, generator: torch.Generator, keys: str = "frame"):
    if keys == "random":
        k = torch.randn(n, dk, generator=generator, dtype=torch.float64)
    elif keys == "frame":  # orthonormal rows (N <= Dk) or the columns of a Dk x N matrix with orthonormal rows
        q, _ = torch.linalg.qr(torch.randn(max(n, dk), max(n, dk), generator=generator, dtype=torch.float64))
        k = q[:n, :dk]
    else:
        raise ValueError(f"keys: expected 'frame' or 'random', received {keys!r}")
    return k / k.norm(dim=-1, keepdim=True), torch.randn(n, dv, generator=generator, dtype=torch.float64)


def read_back(kind: str, keys: torch.Tensor, values: torch.Tensor, *, log_decay: float | None = None,
              sharpness: float = 4.0) -> torch.Tensor:
    """The values ``[N, Dv]`` a memory of ``kind`` (``"delta"``, ``"linear"``, ``"softmax"``) returns when each of
    the N written keys is read back after all N writes."""
    n, dk = keys.shape
    if kind == "softmax":
        o = softmax_attention(keys[None, :, None], keys[None, :, None], values[None, :, None],
                              scale=sharpness * math.sqrt(dk))
        return o[0, :, 0]
    zeros_k, zeros_v = torch.zeros_like(keys), torch.zeros_like(values)
    q = torch.cat([zeros_k, keys])[None, :, None]                       # [1, 2N, 1, Dk]
    k = torch.cat([keys, zeros_k])[None, :, None]
    v = torch.cat([values, zeros_v])[None, :, None]
    g = torch.zeros(1, 2 * n, 1, dtype=keys.dtype)
    if log_decay is not None:
        g[:, :n] = log_decay                                            # writes decay the state, reads do not
    if kind == "delta":
        beta = torch.cat([torch.ones(n), torch.zeros(n)]).to(keys)[None, :, None]
        o, _ = gated_delta_rule(q, k, v, g if log_decay is not None else None, beta, scale=1.0, mode="recurrent")
    elif kind == "linear":
        o, _ = simple_gla(q, k, v, g, scale=1.0, mode="recurrent")
    else:
        raise ValueError(f"kind: expected 'delta', 'linear' or 'softmax', received {kind!r}")
    return o[0, n:, 0]


def recall(read: torch.Tensor, values: torch.Tensor, distractors: torch.Tensor | None = None) -> float:
    """Fraction of reads whose nearest value (cosine) among the stored ones and ``distractors`` is their own."""
    candidates = values if distractors is None else torch.cat([values, distractors])
    cos = torch.nn.functional.normalize(read, dim=-1) @ torch.nn.functional.normalize(candidates, dim=-1).T
    return float((cos.argmax(-1) == torch.arange(len(values))).double().mean())


def capacity_curves(*, dk: int = 16, dv: int = 32, ratios=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0),
                    trials: int = 8, seed: int = 0, vocabulary: int = 256) -> dict:
    """Mean recall over ``trials`` draws for every memory of :data:`MEMORIES` at ``N = ratio * Dk`` pairs, with
    frame keys and with random keys.

    Returns:
        ``{"dk", "dv", "ratios", "trials", "curves": {keys: {memory name: [recall per ratio]}}}`` (JSON-able).
    """
    gen = torch.Generator().manual_seed(seed)
    distractors = torch.randn(vocabulary, dv, generator=gen, dtype=torch.float64)
    curves = {keys: {name: [] for name in MEMORIES} for keys in ("frame", "random")}
    for keys, table in curves.items():
        for ratio in ratios:
            n = max(1, round(ratio * dk))
            draws = [_pairs(n, dk, dv, gen, keys) for _ in range(trials)]
            for name, (kind, log_decay) in MEMORIES.items():
                table[name].append(sum(recall(read_back(kind, k, v, log_decay=log_decay), v, distractors)
                                       for k, v in draws) / trials)
    return {"dk": dk, "dv": dv, "ratios": list(ratios), "trials": trials, "curves": curves}
