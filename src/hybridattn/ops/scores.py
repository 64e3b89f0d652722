"""Score biases: additive terms on the attention logits, described once and used by every backend.

A bias (ALiBi, T5 relative buckets, a user's tensor) is lazy like a mask spec: the tiled backend asks for one
block at a time, so ``Tq x Tk`` is never built unless the naive reference or SDPA needs it.

- ``block(q_len, kv_len, q_idx, kv_idx, *, dtype)``: the bias for the given index vectors,
  ``[B|1, H|1, len(q_idx), len(kv_idx)]``;
- ``dense(q_len, kv_len, *, device, dtype)``: the whole bias ``[B|1, H|1, Tq, Tk]``;
- ``score_mod(q_len, kv_len)``: a FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)``.

Shape legend: B batch, H heads, Tq query length, Tk key length.
"""

from __future__ import annotations

import torch

from hybridattn.ops._checks import check_tensor


class ScoreBias:
    """Base class. Subclasses implement ``block``; ``dense`` and ``score_mod`` follow from it."""

    batch_size: int | None = None
    num_heads: int | None = None

    def block(self, q_len: int, kv_len: int, q_idx: torch.Tensor, kv_idx: torch.Tensor, *, dtype=torch.float32):
        raise NotImplementedError

    def dense(self, q_len: int, kv_len: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
        q_idx = torch.arange(q_len, device=device)
        kv_idx = torch.arange(kv_len, device=device)
        return self.block(q_len, kv_len, q_idx, kv_idx, dtype=dtype)

    def grad_tensors(self) -> tuple[torch.Tensor, ...]:
        """Tensors the bias is computed from that need gradients (a learned T5 table, a user's tensor).

        The tiled backend recomputes ``block`` in its backward pass and routes the bias gradient to these
        tensors. Default: the parameters of an ``nn.Module`` bias, else tensor attributes that require grad."""
        if isinstance(self, torch.nn.Module):
            return tuple(p for p in self.parameters() if p.requires_grad)
        return tuple(t for t in vars(self).values() if isinstance(t, torch.Tensor) and t.requires_grad)

    def score_mod(self, q_len: int, kv_len: int):
        """Default: index into the dense bias (fine for inference-sized inputs; subclasses with a closed form
        override this to avoid building Tq x Tk)."""
        bias = self.dense(q_len, kv_len)
        nb, nh = bias.shape[:2]
        return lambda score, b, h, q, k: score + bias[b % nb, h % nh, q, k].to(score.dtype)


class TensorBias(ScoreBias):
    """A user's float tensor broadcastable to ``[B, H, Tq, Tk]`` (2 to 4 dimensions; missing leading ones are 1,
    as in PyTorch broadcasting: ``[H, Tq, Tk]``, ``[Tq, Tk]``)."""

    def __init__(self, bias: torch.Tensor):
        check_tensor("bias", bias)
        if not 2 <= bias.dim() <= 4:
            raise ValueError(f"bias: expected 2 to 4 dimensions broadcastable to [B, H, Tq, Tk], received shape "
                             f"{tuple(bias.shape)}")
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        self.bias = bias
        self.batch_size = bias.shape[0] if bias.shape[0] != 1 else None
        self.num_heads = bias.shape[1] if bias.shape[1] != 1 else None

    def _expanded(self, q_len, kv_len):
        tq, tk = self.bias.shape[-2:]
        if tq not in (1, q_len) or tk not in (1, kv_len):
            raise ValueError(
                f"bias: expected the last two dimensions broadcastable to (Tq={q_len}, Tk={kv_len}), "
                f"received {tuple(self.bias.shape)}"
            )
        return self.bias.expand(*self.bias.shape[:2], q_len, kv_len)

    def block(self, q_len, kv_len, q_idx, kv_idx, *, dtype=torch.float32):
        b = self._expanded(q_len, kv_len)
        return b.index_select(-2, q_idx.to(b.device)).index_select(-1, kv_idx.to(b.device)).to(dtype)

    def dense(self, q_len, kv_len, *, device=None, dtype=torch.float32):
        return self._expanded(q_len, kv_len).to(dtype)


def as_score_bias(bias, name: str = "bias") -> ScoreBias:
    if isinstance(bias, ScoreBias):
        return bias
    if isinstance(bias, torch.Tensor):
        return TensorBias(bias)
    raise TypeError(f"{name}: expected a ScoreBias (e.g. ALiBi) or a float tensor, received {type(bias).__name__}")
