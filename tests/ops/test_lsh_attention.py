"""Reformer LSH attention: chunked fast path == dense float64 references (the library's and one written here);
one bucket == full attention (without the self pair under shared-QK); without duplicates (the default) == the
softmax over the union of the rounds' keys, each pair counted once."""

import pytest
import torch

from hybridattn.ops.lsh_attention import lsh_attention, lsh_attention_reference, lsh_buckets

CASES = [
    dict(n_buckets=4, n_hashes=1, causal=False, chunk_size=None),
    dict(n_buckets=6, n_hashes=3, causal=True, chunk_size=5),
    dict(n_buckets=2, n_hashes=2, causal=False, chunk_size=8),
]


@pytest.mark.parametrize("dup", [False, True], ids=["dedup", "dup"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate-k", "shared-qk"])
@pytest.mark.parametrize("case", CASES, ids=["nb4-h1", "nb6-h3-causal-c5", "nb2-h2-c8"])
def test_matches_dense_reference(case, shared, dup):
    gen = torch.Generator().manual_seed(1)
    b, t, h, d, dv = 2, 31, 4, 10, 6
    hkv = h if shared else 2
    q = torch.randn(b, t, h, d, generator=gen)
    k = None if shared else torch.randn(b, t, hkv, d, generator=gen)
    v = torch.randn(b, t, hkv, dv, generator=gen)
    grad = torch.randn(b, t, h, dv, generator=gen)
    leaves32 = [x.clone().requires_grad_() for x in (q, k, v) if x is not None]
    leaves64 = [x.double().requires_grad_() for x in (q, k, v) if x is not None]
    split = lambda xs: (xs[0], None, xs[1]) if shared else tuple(xs)  # noqa: E731
    out = lsh_attention(*split(leaves32), seed=5, allow_duplicates=dup, **case)
    ref = lsh_attention_reference(*split(leaves64), seed=5, allow_duplicates=dup, **case)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out, leaves32, grad)
    want = torch.autograd.grad(ref, leaves64, grad.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5)


def dense_softmax64(q, k, v, keep, *, scale):
    """Float64 masked softmax attention written out here: q ``[B, T, H, D]``, k / v ``[B, T, Hkv, X]``, keep
    ``[B|1, H|1, T, T]``; rows that keep nothing give zeros."""
    g = q.shape[2] // k.shape[2]
    kh, vh = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = (scale * torch.einsum("bihd,bjhd->bhij", q, kh)).masked_fill(~keep, float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", w, vh)


def rel(x, ref):
    return float((x.detach().double() - ref.detach()).abs().max() / ref.detach().abs().max())


def grads(fn, leaves, do):
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, [x for x in leaves if x is not None], do.to(out.dtype))]


@pytest.mark.parametrize("dup", [False, True], ids=["dedup", "dup"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate-k", "shared-qk"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", [dict(n_buckets=1), dict(n_buckets=4, chunk_size=14)], ids=["1-bucket", "2-chunks"])
def test_every_round_sees_everything_is_full_attention(layout, causal, shared, dup):
    """Rounds in which every query sees every key (one bucket and one chunk; or two chunks, each looking back at
    the other, while the hashes reorder the tokens) give single-round attention over all keys, each pair once.
    Separate k: full attention. Shared-QK (Reformer): full attention without the self pair, which only a row
    with no other visible key (the first, under causal) uses."""
    gen = torch.Generator().manual_seed(3)
    b, t, h, hkv, d, dv = 2, 27, 6, 6 if shared else 2, 12, 10
    q = torch.randn(b, t, h, d, generator=gen, dtype=torch.float64)
    k = None if shared else torch.randn(b, t, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, t, hkv, dv, generator=gen, dtype=torch.float64)
    do = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
    i = torch.arange(t)
    keep = (i[None, :] <= i[:, None]) if causal else torch.ones(t, t, dtype=torch.bool)
    if shared:
        keep = keep & ((i[:, None] != i[None, :]) | (keep.sum(-1, keepdim=True) == 1))

    def reference(q, k, v):
        kk = torch.nn.functional.normalize(q, dim=-1) if shared else k
        return dense_softmax64(q, kk, v, keep, scale=d ** -0.5)

    split = lambda xs: (xs[0], None, xs[1]) if shared else tuple(xs)  # noqa: E731
    leaves64 = [x.clone().requires_grad_() for x in (q, k, v) if x is not None]
    leaves32 = [x.float().requires_grad_() for x in (q, k, v) if x is not None]
    want = grads(lambda *x: reference(*split(x)), leaves64, do)
    got = grads(lambda *x: lsh_attention(*split(x), n_hashes=3, causal=causal, allow_duplicates=dup, **layout),
                leaves32, do)
    for name, a, w in zip(("o", "dq", "dk", "dv") if not shared else ("o", "dq", "dv"), got, want):
        assert rel(a, w) <= 1e-5, f"{name}: {rel(a, w):.2e}"


def independent_windows(hashed, *, n_buckets, n_hashes, causal, seed, chunk_size):
    """Which keys each query attends in each round, ``[B, Hkv, R, T, T]`` bool, from the description, loop by loop:
    rotations drawn from ``seed`` as documented (``randn(n_hashes, Hkv, D, n_buckets / 2)``, float64, CPU
    generator), buckets by argmax of ``[xR, -xR]`` of the unit-normalised ``hashed`` tokens, rank in (bucket,
    position) order, chunk = rank // c, a query sees its own and the previous chunk (first sees last)."""
    b, t, hkv, d = hashed.shape
    c = chunk_size or -(-t // n_buckets)
    n = -(-t // c)
    rot = torch.randn(n_hashes, hkv, d, max(n_buckets // 2, 1), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)
    pos = torch.arange(t)
    keep = torch.zeros(b, hkv, n_hashes, t, t, dtype=torch.bool)
    for bi in range(b):
        for j in range(hkv):
            x = hashed[bi, :, j].detach().double()
            x = x / x.norm(dim=-1, keepdim=True)
            for r in range(n_hashes):
                proj = x @ rot[r, j]
                bucket = [0] * t if n_buckets == 1 else torch.cat([proj, -proj], -1).argmax(-1).tolist()
                order = sorted(range(t), key=lambda tok: (bucket[tok], tok))
                chunk = torch.empty(t, dtype=torch.long)
                chunk[torch.tensor(order)] = torch.arange(t) // c
                cq, ck = chunk[:, None], chunk[None, :]
                seen = (ck == cq) | (ck == cq - 1) | ((cq == 0) & (ck == n - 1) & (n > 1))
                keep[bi, j, r] = seen & (pos[None, :] <= pos[:, None]) if causal else seen
    return keep


def _independent(q, k, v, per_head, *, n_buckets, n_hashes, causal, seed, chunk_size):
    """``[B, T, H, Dv]`` from ``per_head(s, windows, v)`` for each batch row and head: ``s`` the float64 logits
    ``[T, T]`` (self pair at -1e5 under shared-QK), ``windows`` ``[R, T, T]`` the rounds' attended pairs."""
    shared = k is None
    windows = independent_windows(q if shared else k, n_buckets=n_buckets, n_hashes=n_hashes, causal=causal,
                                  seed=seed, chunk_size=chunk_size)
    k = torch.nn.functional.normalize(q, dim=-1) if shared else k
    b, t, h, d = q.shape
    hkv = k.shape[2]
    rows = []
    for bi in range(b):
        heads = []
        for hi in range(h):
            j = hi // (h // hkv)
            s = d ** -0.5 * q[bi, :, hi] @ k[bi, :, j].T  # (T, T)
            if shared:
                s = torch.where(torch.eye(t, dtype=torch.bool), torch.full_like(s, -1e5), s)
            heads.append(per_head(s, windows[bi, j], v[bi, :, j]))
        rows.append(torch.stack(heads, 1))
    return torch.stack(rows)


def _rounds_with_duplicates(s, windows, v):
    # per round a softmax over that round's window, rounds combined by a softmax over their lse
    outs, lses = [], []
    for seen in windows:
        sr = s.masked_fill(~seen, float("-inf"))
        lses.append(torch.logsumexp(sr, -1))
        outs.append(torch.softmax(sr, -1).nan_to_num(0.0) @ v)
    w = torch.softmax(torch.stack(lses), 0).nan_to_num(0.0)  # (R, T)
    return (w[..., None] * torch.stack(outs)).sum(0)


def _rounds_deduplicated(s, windows, v):
    n_ij = windows.sum(0).clamp(min=1).double()
    # unseen pairs at -inf, so that exp cannot overflow for them; every query sees itself in its own chunk, so each
    # row has a finite max to subtract
    s = s.masked_fill(~windows.any(0), float("-inf"))
    s = s - s.amax(-1, keepdim=True).detach()
    w = sum(torch.where(seen, torch.exp(s - n_ij.log()), torch.zeros_like(s)) for seen in windows)
    return (w / w.sum(-1, keepdim=True)) @ v


def independent_lsh(q, k, v, **options):
    """Reformer LSH attention with duplicates, in float64: per round a softmax over that round's window (self pair
    at -1e5 under shared-QK), rounds combined by a softmax over their lse."""
    return _independent(q, k, v, _rounds_with_duplicates, **options)


def independent_lsh_dedup(q, k, v, **options):
    """The paper's correction by brute force, in float64: N_ij = rounds whose window holds (i, j); pair weight
    ``sum over those rounds of exp(s_ij - log N_ij)``, normalised over every pair of the query's row."""
    return _independent(q, k, v, _rounds_deduplicated, **options)


@pytest.mark.parametrize("dup", [False, True], ids=["dedup", "dup"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate-k", "shared-qk"])
@pytest.mark.parametrize("case", [
    dict(n_buckets=4, n_hashes=3, causal=False, chunk_size=5),
    dict(n_buckets=6, n_hashes=2, causal=True, chunk_size=4),
    dict(n_buckets=2, n_hashes=1, causal=False, chunk_size=12),  # two chunks: each looks back at the other
    dict(n_buckets=4, n_hashes=2, causal=True, chunk_size=None),
], ids=["nb4-h3-c5", "nb6-h2-causal-c4", "nb2-h1-c12", "nb4-h2-causal"])
def test_matches_independent_reference(case, shared, dup):
    gen = torch.Generator().manual_seed(7)
    b, t, h, d, dv = 2, 23, 6, 12, 10
    hkv = h if shared else 2
    q = torch.randn(b, t, h, d, generator=gen, dtype=torch.float64)
    k = None if shared else torch.randn(b, t, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, t, hkv, dv, generator=gen, dtype=torch.float64)
    do = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
    split = lambda xs: (xs[0], None, xs[1]) if shared else tuple(xs)  # noqa: E731
    leaves64 = [x.clone().requires_grad_() for x in (q, k, v) if x is not None]
    leaves32 = [x.float().requires_grad_() for x in (q, k, v) if x is not None]
    reference = independent_lsh if dup else independent_lsh_dedup
    want = grads(lambda *x: reference(*split(x), seed=11, **case), leaves64, do)
    got = grads(lambda *x: lsh_attention(*split(x), seed=11, allow_duplicates=dup, **case), leaves32, do)
    for name, a, w in zip(("o", "dq", "dk", "dv") if not shared else ("o", "dq", "dv"), got, want):
        assert rel(a, w) <= 1e-5, f"{name}: {rel(a, w):.2e}"


@pytest.mark.parametrize("shared", [False, True], ids=["separate-k", "shared-qk"])
@pytest.mark.parametrize("causal", [False, True])
def test_dedup_is_softmax_over_union_of_rounds(causal, shared):
    """Without duplicates each pair counts once: plain softmax attention whose mask is the union of the rounds'
    windows. Rounds that overlap only in part (some pairs in 1 round, some in several) make this differ from the
    per-round count, which is checked too so that the option is seen to act."""
    gen = torch.Generator().manual_seed(13)
    b, t, h, d, dv = 2, 29, 4, 8, 6
    hkv = h if shared else 2
    q = torch.randn(b, t, h, d, generator=gen, dtype=torch.float64)
    k = None if shared else torch.randn(b, t, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, t, hkv, dv, generator=gen, dtype=torch.float64)
    do = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
    case = dict(n_buckets=4, n_hashes=4, causal=causal, seed=3, chunk_size=5)
    windows = independent_windows(q if shared else k, **case)  # (B, Hkv, R, T, T)
    rounds = windows.sum(2)
    assert bool((rounds == 1).any()) and bool((rounds > 1).any())  # partial overlap: duplicates exist
    keep = windows.any(2).repeat_interleave(h // hkv, dim=1)  # (B, H, T, T)
    if shared:
        # Reformer's self pair: used only by a row with nothing else in its union
        i = torch.arange(t)
        keep = keep & ((i[:, None] != i[None, :]) | (keep.sum(-1, keepdim=True) == 1))

    def reference(q, k, v):
        kk = torch.nn.functional.normalize(q, dim=-1) if shared else k
        return dense_softmax64(q, kk, v, keep, scale=d ** -0.5)

    split = lambda xs: (xs[0], None, xs[1]) if shared else tuple(xs)  # noqa: E731
    leaves64 = [x.clone().requires_grad_() for x in (q, k, v) if x is not None]
    leaves32 = [x.float().requires_grad_() for x in (q, k, v) if x is not None]
    want = grads(lambda *x: reference(*split(x)), leaves64, do)
    got = grads(lambda *x: lsh_attention(*split(x), **case), leaves32, do)
    for name, a, w in zip(("o", "dq", "dk", "dv") if not shared else ("o", "dq", "dv"), got, want):
        assert rel(a, w) <= 1e-5, f"{name}: {rel(a, w):.2e}"
    with_dups = lsh_attention(*split(leaves32), allow_duplicates=True, **case)
    assert rel(with_dups, want[0]) > 1e-3


@pytest.mark.parametrize("shared", [False, True], ids=["separate-k", "shared-qk"])
def test_one_round_has_no_duplicates(shared):
    """With one round every pair is attended once: both settings give bit-identical outputs and gradients."""
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(2, 21, 4, 8, generator=gen)
    k = None if shared else torch.randn(2, 21, 2, 8, generator=gen)
    v = torch.randn(2, 21, 4 if shared else 2, 6, generator=gen)
    do = torch.randn(2, 21, 4, 6, generator=gen)
    split = lambda xs: (xs[0], None, xs[1]) if shared else tuple(xs)  # noqa: E731
    results = []
    for dup in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v) if x is not None]
        results.append(grads(lambda *x: lsh_attention(*split(x), n_buckets=4, n_hashes=1, causal=True, seed=2,
                                                       chunk_size=4, allow_duplicates=dup), leaves, do))
    for a, w in zip(*results):
        assert torch.equal(a, w)


def test_buckets_group_similar_keys():
    # two tight clusters of directions land in different buckets in most rounds, and in one bucket each
    base = torch.randn(2, 16)
    keys = torch.cat([base[0] + 0.01 * torch.randn(8, 16), base[1] + 0.01 * torch.randn(8, 16)]).view(1, 16, 1, 16)
    buckets = lsh_buckets(keys, n_buckets=8, n_hashes=4, seed=0)[:, 0, 0]  # (rounds, T)
    assert all(len(set(r[:8].tolist())) == 1 and len(set(r[8:].tolist())) == 1 for r in buckets)


def test_validation():
    q = torch.randn(1, 10, 2, 4)
    with pytest.raises(ValueError, match="n_buckets"):
        lsh_attention(q, q, q, n_buckets=3)
    with pytest.raises(ValueError, match="Tk == Tq"):
        lsh_attention(q, q[:, :5], q[:, :5], n_buckets=2)
    with pytest.raises(TypeError, match="scale: expected a float"):
        lsh_attention(q, q, q, n_buckets=2, scale="x")
    with pytest.raises(ValueError, match="scale: expected a finite float"):
        lsh_attention(q, q, q, n_buckets=2, scale=float("nan"))
    with pytest.raises(TypeError, match="allow_duplicates"):
        lsh_attention(q, q, q, n_buckets=2, allow_duplicates=0)
