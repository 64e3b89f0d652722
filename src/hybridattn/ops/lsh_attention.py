"""Reformer LSH attention (Kitaev et al. 2020): hash tokens into buckets, sort, attend within chunks.

One hashing round ``r``:

1. bucket of token ``t``: ``argmax([x R_r ; -x R_r])`` with ``x`` the unit-normalised key of ``t`` and ``R_r`` a
   random rotation ``[D, n_buckets / 2]`` (angular LSH). Keys and queries share the bucket of their token
   (Reformer's shared-QK); with ``k=None`` the keys *are* the unit-normalised queries, and a token attends to
   itself only when nothing else is visible (its self logit is replaced by ``-1e5``, as in Reformer): its
   weight on itself is ``exp(-1e5 - ...)``, zero in any float format whenever another key is visible;
2. sort tokens by (bucket, position) and cut the sorted order into chunks of ``chunk_size``;
3. each query attends to the keys of its own chunk and of the previous chunk, the first chunk's previous being
   the last (Reformer's look-one-back wraps around; with a single chunk there is no other chunk to look at), and
   with ``causal`` only to keys at its own or earlier positions; this gives ``o_r`` and the log-normaliser
   ``lse_r``.

Rounds combine as ``o = sum_r exp(lse_r - logsumexp_r lse_r) o_r``, a softmax over the keys of every round. A
pair ``(i, j)`` that ``N_ij`` rounds attend (key ``j`` in query ``i``'s own or previous chunk, causally visible;
the shared-QK self pair included) would enter that softmax ``N_ij`` times. By default (``allow_duplicates=False``)
each round subtracts ``log N_ij`` from the pair's logit, as the paper does (App. A) and trax by default
(``allow_duplicate_attention=False``), so the ``N_ij`` copies add up to one: the result is exactly the softmax
over the *union* of the rounds' attended keys. ``N_ij`` comes from the rounds' chunk ids of ``i`` and ``j``
(``O(R)`` per attended slot), never from a ``T x T`` mask. ``allow_duplicates=True`` keeps the per-round count
(lucidrains' reformer-pytorch default), which favours pairs the hashes agree on.

One bucket with the default chunk (``T / n_buckets``) puts every token in one chunk: with separate keys this is
full attention; with shared-QK it is full attention *without the self pair* (the self pair is used only by a
row with no other visible key: the first token under ``causal``).

Causality: with ``causal=True`` no query reads a key at a later position (no gradient flows from ``o[:t]`` to
later keys), but the buckets and the sort use every token, so a later token can change *which* earlier keys
share a chunk with an earlier query. As in Reformer, earlier outputs therefore depend on later tokens through the
hashing; an autoregressive model decoding token by token will not reproduce a full-sequence pass exactly.

Cost ``O(R * T * c * D)`` for the logits, plus ``O(R^2 * T * c)`` for ``N_ij`` when deduplicating.

Shape legend: B batch, T length, H query heads, Hkv key-value heads (G = H / Hkv), D head dim, Dv value head dim,
R = n_hashes rounds, n chunks of c tokens (a query's window: 2c key slots), N_ij rounds in which query i attends
key j.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from hybridattn.ops._checks import check_bthd, check_positive_int, check_qkv, check_scale

__all__ = ["lsh_attention", "lsh_attention_reference", "lsh_buckets"]

#: Reformer's stand-in logit for attending to oneself under shared-QK (finite, so a lone token still attends)
SELF_LOGIT = -1e5


def lsh_buckets(keys: torch.Tensor, *, n_buckets: int, n_hashes: int, seed: int) -> torch.Tensor:
    """Bucket ids ``[n_hashes, B, Hkv, T]`` of ``keys [B, T, Hkv, D]`` by random rotations drawn from ``seed``
    (on the CPU, so every device hashes alike)."""
    b, t, hkv, d = keys.shape
    if n_buckets == 1:
        return torch.zeros(n_hashes, b, hkv, t, dtype=torch.long, device=keys.device)
    gen = torch.Generator().manual_seed(seed)
    rot = torch.randn(n_hashes, hkv, d, n_buckets // 2, generator=gen, dtype=torch.float64)
    # hashing in float64 makes the buckets of a float32 call and of its float64 reference identical
    rot = rot.to(keys.device)
    x = F.normalize(keys.detach().double(), dim=-1)
    proj = torch.einsum("bthd,rhdn->rbhtn", x, rot)
    return torch.cat([proj, -proj], dim=-1).argmax(-1)


def _prepare(q, k, v, n_buckets, n_hashes, causal, seed, chunk_size, allow_duplicates):
    shared = k is None
    if shared:
        check_bthd("q", q)
        k = F.normalize(q, dim=-1)
    hashed = q if shared else k  # same directions as k; hashing q avoids the rounding of the normalisation
    b, tq, h, d, tk, hkv, dv = check_qkv(q, k, v)
    if tq != tk:
        raise ValueError(f"k: LSH attention hashes queries and keys of the same tokens; expected Tk == Tq={tq}, "
                         f"received Tk={tk}")
    check_positive_int("n_buckets", n_buckets)
    if n_buckets > 1 and n_buckets % 2:
        raise ValueError(f"n_buckets: expected 1 or an even number (angular LSH uses +-rotations), received {n_buckets}")
    check_positive_int("n_hashes", n_hashes)
    check_positive_int("seed", seed, allow_zero=True)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, received {type(causal).__name__}")
    if not isinstance(allow_duplicates, bool):
        raise TypeError(f"allow_duplicates: expected a bool, received {type(allow_duplicates).__name__}")
    chunk = -(-tq // n_buckets) if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    buckets = lsh_buckets(hashed, n_buckets=n_buckets, n_hashes=n_hashes, seed=seed)
    return k, shared, max(chunk, 1), buckets


def _pair_counts(chunk_of, r, q_pos, k_pos, n):
    """``N_ij`` for round ``r``'s slots: in how many rounds query ``q_pos`` ``[B, Hkv, n, c]`` has key ``k_pos``
    ``[B, Hkv, n, 2c]`` in its own or previous chunk, from ``chunk_of`` ``[R, B, Hkv, T]`` (chunk of each token in
    each round). Causal visibility does not depend on the round, so chunk membership decides; padded slots
    (position -1) get some count >= 1 and are masked by the caller. Returns ``[B, Hkv, n, c, 2c]`` (int)."""
    b, hkv, _, c = q_pos.shape
    qi, ki = q_pos.clamp(min=0).reshape(b, hkv, -1), k_pos.clamp(min=0).reshape(b, hkv, -1)
    # round r attends every slot of its own window by construction: start from 1 and look only at the others
    count = torch.ones(b, hkv, n, c, 2 * c, dtype=torch.int32, device=q_pos.device)
    for other in range(chunk_of.shape[0]):
        if other == r:
            continue
        qc = chunk_of[other].gather(-1, qi).view(b, hkv, n, c, 1)
        kc = chunk_of[other].gather(-1, ki).view(b, hkv, n, 1, 2 * c)
        # a single chunk has no previous one (see the window below): every key is in the query's chunk
        seen = (kc == qc) | (kc == (qc - 1) % n) if n > 1 else (kc == qc)
        count += seen
    return count


def _combine_rounds(outs, lses):
    """``sum_r softmax_r(lse) o_r`` with rows that saw nothing in every round left at zero."""
    o, lse = torch.stack(outs), torch.stack(lses)  # (R, B, Hkv, T, G, Dv), (R, B, Hkv, T, G)
    # softmax over rounds relative to the largest lse: differences of nearby lse are exact, whereas
    # exp(lse - logsumexp) would round logsumexp of Reformer's -1e5 self logits in float32
    m = lse.amax(0).detach()
    e = torch.exp(lse - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    total = e.sum(0)
    w = e / torch.where(total > 0, total, torch.ones_like(total))
    return (w.unsqueeze(-1) * o).sum(0)


def lsh_attention(q, k, v, *, n_buckets: int, n_hashes: int = 1, causal: bool = False, seed: int = 0,
                  chunk_size: int | None = None, scale: float | None = None, allow_duplicates: bool = False):
    """Reformer attention over LSH buckets (see module docstring).

    Args:
        q: queries ``[B, T, H, D]``.
        k: keys ``[B, T, Hkv, D]`` (``H % Hkv == 0``), or ``None`` for shared-QK (keys = unit-normalised q).
        v: values ``[B, T, Hkv, Dv]`` (``Hkv = H`` with shared-QK).
        n_buckets: buckets per round, 1 or even.
        n_hashes: hashing rounds.
        causal: queries attend to earlier positions only.
        seed: seed of the random rotations.
        chunk_size: tokens per chunk of the sorted order; default ``ceil(T / n_buckets)``.
        scale: logit scale, default ``1 / sqrt(D)``.
        allow_duplicates: count a pair once per round that attends it (``True``), or once overall (``False``,
            the paper's ``- log N_ij``: the softmax over the union of the rounds' keys).

    Returns:
        ``o`` ``[B, T, H, Dv]``; rows without any visible key are zero.

    Raises:
        TypeError / ValueError: invalid tensors or options (the message names the argument).
    """
    k, shared, c, buckets = _prepare(q, k, v, n_buckets, n_hashes, causal, seed, chunk_size, allow_duplicates)
    b, t, h, d = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    g = h // hkv
    scale = check_scale(scale, d)
    n = -(-t // c)
    pad = n * c - t
    pos = torch.arange(t, device=q.device)
    qh = q.view(b, t, hkv, g, d).transpose(1, 2)  # (B, Hkv, T, G, D)
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
    perms = torch.argsort(buckets * t + pos, dim=-1)  # (R, B, Hkv, T) stable order: bucket, then position
    unperms = torch.argsort(perms, dim=-1)  # rank of each token in each round's order
    dedup = not allow_duplicates and n_hashes > 1  # one round has no duplicates to correct
    chunk_of = unperms // c if dedup else None
    outs, lses = [], []
    for r, (perm, unperm) in enumerate(zip(perms, unperms)):  # (B, Hkv, T) each
        qs = qh.gather(2, perm[..., None, None].expand(-1, -1, -1, g, d))
        ks = kh.gather(2, perm[..., None].expand(-1, -1, -1, d))
        vs = vh.gather(2, perm[..., None].expand(-1, -1, -1, dv))
        ps = F.pad(perm, (0, pad), value=-1)  # padded slots: position -1, never visible
        qs = F.pad(qs, (0, 0, 0, 0, 0, pad)).view(b, hkv, n, c, g, d)
        ks, vs = F.pad(ks, (0, 0, 0, pad)).view(b, hkv, n, c, d), F.pad(vs, (0, 0, 0, pad)).view(b, hkv, n, c, dv)
        # keys of chunk i: chunk i - 1 (the last chunk for the first: Reformer's wrap-around) followed by chunk i;
        # a single chunk has no other to look at, and rolling it onto itself would count every key twice
        prev = (lambda x, fill: torch.full_like(x, fill)) if n == 1 else (lambda x, fill: x.roll(1, dims=2))  # noqa: E731
        k_win = torch.cat([prev(ks, 0.0), ks], dim=3)  # (B, Hkv, n, 2c, D)
        v_win = torch.cat([prev(vs, 0.0), vs], dim=3)
        q_pos = ps.view(b, hkv, n, c)
        k_pos = torch.cat([prev(q_pos, -1), q_pos], dim=3)  # (B, Hkv, n, 2c)
        visible = k_pos[:, :, :, None, :] >= 0
        if causal:
            visible = visible & (k_pos[:, :, :, None, :] <= q_pos[..., None])
        s = scale * torch.einsum("bhncgd,bhnkd->bhncgk", qs, k_win)
        if shared:
            s = s.masked_fill((k_pos[:, :, :, None, :] == q_pos[..., None])[:, :, :, :, None], SELF_LOGIT)
        if dedup:
            s = s - _pair_counts(chunk_of, r, q_pos, k_pos, n).to(s.dtype).log()[:, :, :, :, None]
        s = s.masked_fill(~visible[:, :, :, :, None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, n, c, G)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
        o = torch.einsum("bhncgk,bhnkd->bhncgd", p, v_win).reshape(b, hkv, n * c, g, dv)[:, :, :t]
        lse = lse.reshape(b, hkv, n * c, g)[:, :, :t]
        outs.append(o.gather(2, unperm[..., None, None].expand(-1, -1, -1, g, dv)))
        lses.append(lse.gather(2, unperm[..., None].expand(-1, -1, -1, g)))
    o = _combine_rounds(outs, lses)  # (B, Hkv, T, G, Dv)
    return o.transpose(1, 2).reshape(b, t, h, dv)


def lsh_attention_reference(q, k, v, *, n_buckets: int, n_hashes: int = 1, causal: bool = False, seed: int = 0,
                            chunk_size: int | None = None, scale: float | None = None,
                            allow_duplicates: bool = False):
    """Float64 dense reference: per round, the ``T x T`` mask "same or previous chunk of the sorted order, the
    first chunk's previous being the last" (chunk of token t = its rank in the (bucket, position) order //
    chunk), full softmax, lse combination; without duplicates, ``log N_ij`` (``N_ij``: the rounds' masks summed)
    is subtracted from every round's logits."""
    k, shared, c, buckets = _prepare(q, k, v, n_buckets, n_hashes, causal, seed, chunk_size, allow_duplicates)
    b, t, h, d = q.shape
    g = h // k.shape[2]
    scale = check_scale(scale, d)
    kh = k.double().repeat_interleave(g, dim=2)
    vh = v.double().repeat_interleave(g, dim=2)
    logits = scale * torch.einsum("bthd,bshd->bhts", q.double(), kh)  # (B, H, T, T)
    if shared:
        logits = logits.masked_fill(torch.eye(t, dtype=torch.bool, device=q.device), SELF_LOGIT)
    i = torch.arange(t, device=q.device)
    keeps = []
    for bucket in buckets:
        rank = torch.empty_like(bucket)
        for bi in range(b):  # plain loops: rank of each token in the sorted order
            for hi in range(bucket.shape[1]):
                order = sorted(range(t), key=lambda j: (int(bucket[bi, hi, j]), j))
                for r, j in enumerate(order):
                    rank[bi, hi, j] = r
        chunk = (rank // c).repeat_interleave(g, dim=1)  # (B, H, T)
        diff = chunk[..., :, None] - chunk[..., None, :]
        n_chunks = -(-t // c)
        keep = (diff == 0) | (diff == 1) | ((diff == 1 - n_chunks) & (n_chunks > 1))
        if causal:
            keep = keep & (i[None, :] <= i[:, None])
        keeps.append(keep)
    pair_rounds = torch.stack(keeps).sum(0).clamp(min=1).double()  # N_ij (1 where unseen: masked anyway)
    outs, lses = [], []
    for keep in keeps:
        s = logits if allow_duplicates else logits - pair_rounds.log()
        s = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, -1)
        w = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
        o = torch.einsum("bhts,bshd->bhtd", w, vh)
        # to the fast path's (B, Hkv, T, G, Dv) / (B, Hkv, T, G) layout for the shared combination
        outs.append(o.view(b, -1, g, t, o.shape[-1]).transpose(2, 3))
        lses.append(lse.view(b, -1, g, t).transpose(2, 3))
    o = _combine_rounds(outs, lses)
    return o.transpose(1, 2).reshape(b, t, h, -1)
