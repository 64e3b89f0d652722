"""Autoregressive generation for ``HybridLM``: one prefill (chunk form), then one token per step (recurrent form).

    out = model.generate(input_ids, max_new_tokens=32, temperature=0.8, top_p=0.9, stop=[eos])
    for tokens in model.generate(input_ids, 32, stream=True):   # tokens: [B], the new token of each row
        ...

Batches with prompts of different lengths are left-padded; pass ``attention_mask`` (1/True = real token, as in
transformers) or ``token_mask``. Rows that met a stop token keep receiving ``config.pad_token_id``.

Shape legend: B batch, T prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import math

from typing import Iterator, Sequence

import torch

from hybridattn.ops._checks import check_positive_int


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the ``top_k`` largest logits and the smallest set whose probabilities sum to ``top_p``; -inf elsewhere."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token is always kept)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[B]`` from logits ``[B, V]``: greedy when ``temperature == 0``, else sampled from
    ``softmax(logits / temperature)`` restricted by ``top_k`` / ``top_p``."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = _filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check_options(max_new_tokens, temperature, top_k, top_p, stop, vocab_size) -> list[int]:
    check_positive_int("max_new_tokens", max_new_tokens, allow_zero=True)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float, received {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), received {temperature!r}")
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if top_p is not None and not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a number in (0, 1], received {top_p!r}")
    return _stop_ids(stop, vocab_size)


def _stop_ids(stop, vocab_size: int) -> list[int]:
    """``stop`` as a list of ints: an int, a sequence of ints or an integer tensor of at most one dimension."""
    if stop is None:
        return []
    if isinstance(stop, torch.Tensor):
        if stop.is_floating_point() or stop.is_complex() or stop.dtype == torch.bool or stop.dim() > 1:
            raise TypeError(f"stop: expected an integer tensor of at most one dimension, received "
                            f"{stop.dtype} of shape {tuple(stop.shape)}")
        stop = stop.reshape(-1).tolist()
    elif isinstance(stop, int) and not isinstance(stop, bool):
        stop = [stop]
    elif not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop: expected a token id, a list of them or an integer tensor, received "
                        f"{type(stop).__name__} {stop!r}")
    for s in stop:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"stop: expected int token ids, received {type(s).__name__} {s!r}")
        if not 0 <= s < vocab_size:
            raise ValueError(f"stop: expected token ids in [0, {vocab_size}), received {s}")
    return list(stop)


def _mask_from(input_ids, attention_mask, token_mask):
    if attention_mask is not None and token_mask is not None:
        raise ValueError("attention_mask/token_mask: expected at most one of them, received both")
    mask = attention_mask if attention_mask is not None else token_mask
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: expected a tensor of shape {tuple(input_ids.shape)} (that of input_ids), "
                         f"received {getattr(mask, 'shape', type(mask).__name__)}")
    mask = mask.to(device=input_ids.device, dtype=torch.bool)
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask: expected left padding (every row's last token real), received a row whose "
                         "last token is padding")
    return mask


def stream_tokens(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, stop: int | Sequence[int] | None = None,
                  attention_mask: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """An iterator of the new token of every row (``[B]``), step by step; arguments as :func:`generate`.
    Options are checked now, not at the first ``next()``."""
    stops = _check_options(max_new_tokens, temperature, top_k, top_p,
                           model.config.eos_token_id if stop is None else stop, model.config.vocab_size)
    mask = _mask_from(input_ids, attention_mask, token_mask)
    model._check_ids(input_ids)
    return _steps(model, input_ids, mask, max_new_tokens, stops, dict(temperature=temperature, top_k=top_k,
                                                                       top_p=top_p, generator=generator))


@torch.no_grad()
def _steps(model, input_ids, mask, max_new_tokens: int, stops: list[int], sampling: dict):
    if max_new_tokens == 0:
        return
    b = input_ids.shape[0]
    cache = model.new_cache(b)
    last = torch.tensor([-1], device=input_ids.device)
    logits, cache = model(input_ids, cache=cache, token_mask=mask, logits_at=last)  # prefill: chunk form
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=input_ids.device)
    pad = model.config.pad_token_id
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], **sampling)
        token = token.masked_fill(done, pad)
        yield token
        done = done | torch.isin(token, stop_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits, cache = model(token.unsqueeze(1), cache=cache)  # one step: recurrent form


def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop: int | Sequence[int] | None = None,
             stream: bool = False, attention_mask: torch.Tensor | None = None,
             token_mask: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """Continue ``input_ids`` by up to ``max_new_tokens`` tokens.

    Args:
        model: a ``HybridLM``.
        input_ids: ``[B, T]`` prompts, left-padded when their lengths differ.
        max_new_tokens: N, the most tokens to add.
        temperature: 0 = greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
        top_k: sample among the ``top_k`` most likely tokens only.
        top_p: nucleus sampling: among the most likely tokens whose probabilities sum to ``top_p``.
        stop: token id(s) that end a row (default ``config.eos_token_id``); generation ends when every row stopped.
        stream: return an iterator of ``[B]`` new tokens instead of the finished tensor.
        attention_mask: ``[B, T]`` 1/True = real token, 0/False = left padding (transformers' convention).
        token_mask: the same as a bool tensor (give one of the two).
        generator: a ``torch.Generator`` for reproducible sampling.

    Returns:
        ``[B, T + N']`` (prompt followed by the new tokens, ``N' <= N``; rows that stopped early are padded with
        ``config.pad_token_id``), or with ``stream=True`` an iterator of ``[B]`` tensors.

    Raises:
        ValueError / TypeError: bad ids or options; padding that is not on the left.
    """
    tokens = stream_tokens(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           stop=stop, attention_mask=attention_mask, token_mask=token_mask, generator=generator)
    if stream:
        return tokens
    new = list(tokens)
    if not new:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)
