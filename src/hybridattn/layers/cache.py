"""The one cache protocol shared by every sequence mixer (see docs/dev/CONTRACTS.md).

A mixer's ``new_cache(batch_size)`` returns a :class:`Cache`; ``forward(x, cache=cache)`` mutates it in place so
the next call continues where this one stopped. Calls may carry a ``token_mask`` (True = real token, False = left
padding): padding is stored (so every row of the batch advances by the same number of slots) but marked invalid,
and it does not advance the row's count of real tokens, which gives RoPE its positions.

- :class:`Cache`: base, ``seen_tokens`` (tokens consumed incl. padding), ``nbytes()`` and ``reset()``.
- :class:`KVCache`: keys/values that grow by appended tokens. Storage is preallocated and doubles when full, so
  appending ``N`` tokens one at a time costs ``O(N)`` copies in total, not ``O(N^2)`` as ``torch.cat`` per step.
- :class:`SlidingWindowKVCache`: a ring buffer of the last ``W`` keys/values, for sliding-window attention; memory
  stays ``O(W)`` however long the sequence.
- :class:`PinnedWindowKVCache`: that ring buffer plus the keys/values at a few fixed token positions (Longformer's
  global tokens), which every later query may see.

KV caches return keys in time order, so a column is a token slot; ``key_positions`` maps the columns of the last
``update`` to each row's token positions (real tokens counted, padding negative) for patterns tied to positions.

Caches are for inference: they copy keys/values into preallocated storage in place, so run them under
``torch.no_grad()`` (training calls pass ``cache=None``).

Shape legend: B batch, T tokens in this call, H key/value heads, D head dim, L cached slots, W window.
"""

from __future__ import annotations

import torch

from hybridattn.ops._checks import check_bthd, check_positive_int, check_shape, check_tensor


class Cache:
    """What a mixer remembers between calls. Subclasses list their tensors in ``tensors()``."""

    def __init__(self):
        #: tokens consumed so far, padding included (the same for every row of the batch)
        self.seen_tokens = 0

    def tensors(self) -> list[torch.Tensor]:
        return []

    def nbytes(self) -> int:
        """Bytes of the tensors this cache holds (allocated capacity, not only the used part)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        """Forget every token consumed, keeping the storage, so the cache can serve new sequences of the same batch
        size. Every cache implements it; the base class cannot know what a subclass remembers besides its tensors."""
        raise NotImplementedError(f"{type(self).__name__}.reset: every cache must implement reset() "
                                  "(docs/dev/CONTRACTS.md)")


def check_token_mask(token_mask, batch: int, seq_len: int, device) -> torch.Tensor | None:
    """Validate a ``[B, T]`` bool token mask (True = real token); None passes through."""
    if token_mask is None:
        return None
    check_tensor("token_mask", token_mask, floating=False)
    if token_mask.dtype != torch.bool:
        raise TypeError(f"token_mask: expected torch.bool (True = real token), received {token_mask.dtype}")
    check_shape("token_mask", token_mask, (batch, seq_len))
    if token_mask.device != device:
        raise ValueError(f"token_mask: expected device {device} (the device of x), received {token_mask.device}")
    return token_mask


def token_positions(token_mask: torch.Tensor | None, seq_len: int, *, start: torch.Tensor | None = None, device=None):
    """Positions of this call's tokens counting real tokens only: ``[B, T]`` long (``[T]`` when neither a mask nor
    per-row ``start`` is given).

    Args:
        token_mask: ``[B, T]`` bool or None (all real).
        seq_len: T.
        start: ``[B]`` real tokens already seen per row (from a cache), or None for 0.
        device: device of the result when neither tensor is given.

    Padding tokens get the position of the next real token (clamped at ``start``); their value never matters
    because they are masked out as keys and their outputs are zeroed.
    """
    if token_mask is None:
        device = start.device if start is not None else device
        pos = torch.arange(seq_len, device=device)
        return pos if start is None else start.unsqueeze(1) + pos
    pos = token_mask.long().cumsum(1) - 1
    pos = pos.clamp(min=0)
    return pos if start is None else start.unsqueeze(1) + pos


def slot_positions(real_tokens: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``[B, L]`` token positions of the last ``L`` slots of left-padded rows that hold ``real_tokens`` ``[B]``
    real tokens so far: the newest slot is ``real_tokens - 1`` and padding slots are negative."""
    return real_tokens.unsqueeze(1) - num_slots + torch.arange(num_slots, device=real_tokens.device)


class _KVBase(Cache):
    """Shared bookkeeping of the key/value caches: shapes, per-row real-token counts, validity of slots."""

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, *, device=None, dtype=torch.float32):
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.dtype = dtype
        #: ``[B]`` real (non-padding) tokens seen per row: the RoPE position of the row's next token
        self.real_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        # True once any padding has been stored, so callers can skip the key mask (and keep SDPA's fast path)
        self._has_padding = False

    @property
    def device(self) -> torch.device:
        return self.real_tokens.device

    def reset(self) -> None:
        self.seen_tokens = 0
        self.real_tokens.zero_()
        self._has_padding = False

    @property
    def consecutive(self) -> bool:
        """Whether the last ``update`` returned consecutive token slots (no pinned keys in front of them)."""
        return True

    def key_positions(self, num_keys: int) -> torch.Tensor | None:
        """Token positions of the ``num_keys`` keys the last ``update`` returned (the newest slots, in time order):
        ``[B, L]`` when some row is padded, ``[1, L]`` otherwise, or None when they are ``0 .. L - 1`` in every
        row (the columns are the positions)."""
        if self._has_padding:
            return slot_positions(self.real_tokens, num_keys)
        if num_keys == self.seen_tokens:
            return None
        return (self.seen_tokens - num_keys + torch.arange(num_keys, device=self.device)).unsqueeze(0)

    def positions(self, seq_len: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` RoPE positions of the next call's tokens, continuing each row's count of real tokens."""
        return token_positions(token_mask, seq_len, start=self.real_tokens)

    def _validate_and_count(self, k, v, token_mask):
        b, t, h, d = check_bthd("k", k)
        if (b, h, d) != (self.batch_size, self.num_heads, self.head_dim):
            raise ValueError(
                f"k: expected [B={self.batch_size}, T, H={self.num_heads}, D={self.head_dim}] to match the cache, "
                f"received {tuple(k.shape)}"
            )
        check_shape("v", v, k.shape)
        for name, x in (("k", k), ("v", v)):
            if x.device != self.device:
                raise ValueError(f"{name}: expected device {self.device} (the cache's device), received {x.device}")
            if x.dtype != self.dtype:
                raise TypeError(f"{name}: expected dtype {self.dtype} (the cache's dtype), received {x.dtype}")
        token_mask = check_token_mask(token_mask, b, t, self.device)
        if token_mask is not None:
            if bool(((self.real_tokens > 0) & ~token_mask.all(1)).any()):
                # relative positions (ALiBi, T5, windows) are slot distances, exact only for left padding
                raise ValueError(
                    "token_mask: expected left padding, received padding for a row that already has real tokens "
                    f"in the cache (real tokens per row: {self.real_tokens.tolist()})"
                )
            self._has_padding = self._has_padding or not bool(token_mask.all())
            self.real_tokens += token_mask.sum(1)
        else:
            self.real_tokens += t
        self.seen_tokens += t
        return t, token_mask


class KVCache(_KVBase):
    """Keys and values of every token seen so far, in time order.

    Args:
        batch_size, num_heads, head_dim: B, H (key/value heads), D.
        device, dtype: of the stored keys/values.
        capacity: initial number of slots; doubles whenever an append does not fit.

    ``update(k, v, token_mask)`` appends ``[B, T, H, D]`` keys/values and returns ``(k_all, v_all, key_valid)``:
    ``[B, L, H, D]`` views of every cached slot (the new ones last) and ``[B, L]`` bool validity, or None when no
    slot is padding.
    """

    def __init__(self, batch_size, num_heads, head_dim, *, device=None, dtype=torch.float32, capacity: int = 64):
        super().__init__(batch_size, num_heads, head_dim, device=device, dtype=dtype)
        capacity = check_positive_int("capacity", capacity)
        self.k = torch.zeros(batch_size, capacity, num_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        #: slots in use
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def tensors(self):
        return [self.k, self.v, self.valid, self.real_tokens]

    def _grow(self, needed: int) -> None:
        cap = max(needed, 2 * self.capacity)
        for name in ("k", "v", "valid"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], cap, *old.shape[2:]))
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def update(self, k: torch.Tensor, v: torch.Tensor, token_mask: torch.Tensor | None = None):
        t, token_mask = self._validate_and_count(k, v, token_mask)
        start, end = self.length, self.length + t
        if end > self.capacity:
            self._grow(end)
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        self.valid[:, start:end] = True if token_mask is None else token_mask
        self.length = end
        return self.contents()

    def contents(self):
        """``(k, v, key_valid)`` of every cached slot: ``[B, L, H, D]`` views and ``[B, L]`` bool or None."""
        key_valid = self.valid[:, : self.length] if self._has_padding else None
        return self.k[:, : self.length], self.v[:, : self.length], key_valid

    def reset(self) -> None:
        super().reset()
        self.length = 0
        self.valid.zero_()

    def clear(self) -> None:
        """The name :meth:`reset` had before it joined the cache protocol."""
        self.reset()


class SlidingWindowKVCache(_KVBase):
    """Ring buffer of the last ``window`` keys/values, for attention where a query sees at most ``window`` keys
    (itself included).

    ``update(k, v, token_mask)`` returns ``(k_all, v_all, key_valid)`` covering the buffered slots in time order
    followed by the ``T`` new ones (``[B, min(seen, W) + T, H, D]``), then keeps only the last ``W`` slots. The
    caller applies the window mask to that key range; with it the result equals full attention over the whole
    sequence with a sliding-window mask, while storage stays ``W`` slots.
    """

    def __init__(self, batch_size, num_heads, head_dim, window: int, *, device=None, dtype=torch.float32):
        super().__init__(batch_size, num_heads, head_dim, device=device, dtype=dtype)
        self.window = check_positive_int("window", window)
        self.k = torch.zeros(batch_size, window, num_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch_size, window, dtype=torch.bool, device=device)

    def tensors(self):
        return [self.k, self.v, self.valid, self.real_tokens]

    def reset(self) -> None:
        super().reset()
        self.valid.zero_()

    @property
    def filled(self) -> int:
        return min(self.seen_tokens, self.window)

    def update(self, k: torch.Tensor, v: torch.Tensor, token_mask: torch.Tensor | None = None):
        w, seen, filled = self.window, self.seen_tokens, self.filled
        t, token_mask = self._validate_and_count(k, v, token_mask)
        # slot of token s is s % W, so the oldest buffered token sits at (seen - filled) % W
        order = (seen - filled + torch.arange(filled, device=self.device)) % w
        new_valid = torch.ones_like(k[..., 0, 0], dtype=torch.bool) if token_mask is None else token_mask
        k_all = torch.cat((self.k.index_select(1, order), k), dim=1)
        v_all = torch.cat((self.v.index_select(1, order), v), dim=1)
        valid_all = torch.cat((self.valid.index_select(1, order), new_valid), dim=1)
        keep = min(t, w)
        slots = (seen + t - keep + torch.arange(keep, device=self.device)) % w
        self.k[:, slots] = k[:, t - keep :]
        self.v[:, slots] = v[:, t - keep :]
        self.valid[:, slots] = new_valid[:, t - keep :]
        return k_all, v_all, valid_all if self._has_padding else None


class PinnedWindowKVCache(SlidingWindowKVCache):
    """A :class:`SlidingWindowKVCache` of the last ``window`` keys/values plus the keys/values at the token positions
    ``pinned`` (Longformer's global tokens), which every later query may see however far back they are.

    Positions count each row's real tokens (as RoPE does), so a left-padded row pins its own tokens. ``update``
    returns the pinned keys that have left the window first (a key still in the window is returned once, from the
    window), then the window's keys as :class:`SlidingWindowKVCache` does; ``key_positions`` gives every column's
    position, so the caller evaluates its pattern there. Storage: ``window + len(pinned)`` slots.
    """

    def __init__(self, batch_size, num_heads, head_dim, window: int, pinned, *, device=None, dtype=torch.float32):
        super().__init__(batch_size, num_heads, head_dim, window, device=device, dtype=dtype)
        try:
            pinned = sorted({int(p) for p in pinned})
        except (TypeError, ValueError):
            raise TypeError(f"pinned: expected an iterable of int token positions, received {pinned!r}") from None
        if pinned and pinned[0] < 0:
            raise ValueError(f"pinned: expected token positions >= 0, received {pinned}")
        self.pinned = tuple(pinned)
        self._pinned_at = torch.tensor(pinned, dtype=torch.long, device=self.device)  # (G,)
        self.pinned_k = torch.zeros(batch_size, len(pinned), num_heads, head_dim, device=device, dtype=dtype)
        self.pinned_v = torch.zeros_like(self.pinned_k)
        self.pinned_valid = torch.zeros(batch_size, len(pinned), dtype=torch.bool, device=device)
        self._returned = self._pinned_at[None, :0]  # positions of the pinned columns the last update returned

    def tensors(self):
        return super().tensors() + [self.pinned_k, self.pinned_v, self.pinned_valid]

    def reset(self) -> None:
        super().reset()
        self.pinned_valid.zero_()
        self._returned = self._pinned_at[None, :0]

    def update(self, k: torch.Tensor, v: torch.Tensor, token_mask: torch.Tensor | None = None):
        k_win, v_win, valid_win = super().update(k, v, token_mask)
        t, n_win = k.shape[1], k_win.shape[1]
        if t:
            # store the new tokens that sit at pinned positions: (B, T, G) matches, at most one per row and position
            hit = slot_positions(self.real_tokens, t)[:, :, None] == self._pinned_at
            found = hit.any(1)  # (B, G)
            src = hit.long().argmax(1)[:, :, None, None].expand(-1, -1, *self.pinned_k.shape[2:])
            self.pinned_k.copy_(torch.where(found[..., None, None], k.gather(1, src), self.pinned_k))
            self.pinned_v.copy_(torch.where(found[..., None, None], v.gather(1, src), self.pinned_v))
            self.pinned_valid |= found
        if not self._has_padding:
            # every row has the same positions, so the pinned keys older than the window are known without a sync
            older = [i for i, p in enumerate(self.pinned) if p < self.seen_tokens - n_win]
            self._returned = self._pinned_at[older][None]  # (1, G')
            return (torch.cat((self.pinned_k[:, older], k_win), 1), torch.cat((self.pinned_v[:, older], v_win), 1),
                    None)
        first = (self.real_tokens - n_win)[:, None]  # (B, 1) position of the window's oldest column
        live = self.pinned_valid & (self._pinned_at < first)  # (B, G)
        self._returned = torch.where(live, self._pinned_at, -1)
        return (torch.cat((self.pinned_k, k_win), 1), torch.cat((self.pinned_v, v_win), 1),
                torch.cat((live, valid_win), 1))

    @property
    def consecutive(self) -> bool:
        return self._returned.shape[1] == 0

    def key_positions(self, num_keys: int) -> torch.Tensor | None:
        n_pinned = self._returned.shape[1]
        window = super().key_positions(num_keys - n_pinned)
        if n_pinned == 0:
            return window
        if window is None:
            window = torch.arange(num_keys - n_pinned, device=self.device).unsqueeze(0)
        return torch.cat((self._returned.expand(window.shape[0], -1), window), 1)


class RecurrentCache(Cache):
    """What a linear mixer carries between calls: its recurrent state and the tail of its short convolution.

    Args:
        state: ``[B, H, Dk, Dv]`` recurrent state (float32 for every model dtype below float64, as fla keeps it).
        conv_tail: ``[B, K - 1, C]`` last ``K - 1`` real conv inputs, or None for a mixer without a short conv.

    Unlike a KV cache its size does not depend on the number of tokens consumed. ``advance(state, T, mask)``
    stores the state an op returned after a call of ``T`` tokens.
    """

    def __init__(self, state: torch.Tensor, conv_tail: torch.Tensor | None = None):
        super().__init__()
        check_tensor("state", state, ndim=4)
        if conv_tail is not None:
            check_tensor("conv_tail", conv_tail, ndim=3)
            if conv_tail.shape[0] != state.shape[0]:
                raise ValueError(f"conv_tail: expected batch size {state.shape[0]} (the batch of state), "
                                 f"received shape {tuple(conv_tail.shape)}")
        self.state = state
        self.conv_tail = conv_tail
        #: ``[B]`` real (non-padding) tokens seen per row
        self.real_tokens = torch.zeros(state.shape[0], dtype=torch.long, device=state.device)

    def tensors(self):
        return [t for t in (self.state, self.conv_tail, self.real_tokens) if t is not None]

    def reset(self) -> None:
        # a fresh sequence starts from a zero state and a zero conv tail (what new_cache builds)
        self.seen_tokens = 0
        for t in self.tensors():
            t.zero_()

    def advance(self, state: torch.Tensor, seq_len: int, token_mask: torch.Tensor | None = None) -> None:
        """Store the state after a call of ``seq_len`` tokens (copied in place, in the cache's dtype)."""
        check_shape("state", state, self.state.shape)
        self.state.copy_(state)
        self.seen_tokens += seq_len
        self.real_tokens += seq_len if token_mask is None else token_mask.sum(1)
