"""Every softmax backend against the float64 naive reference: outputs and input gradients."""

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hybridattn.ops import masks
from hybridattn.bench.measure import peak_memory
from hybridattn.ops.masks import Causal
from hybridattn.ops.scores import TensorBias
from hybridattn.ops.softmax_attention import DENSE_LIMIT, choose_backend, naive_attention, softmax_attention
from hybridattn.ops.tiled_attention import tiled_attention

TOL = 1e-5  # relative error for fp32, max |x - ref| / max |ref|, outputs and gradients


def rel_err(x, ref, *, zero_scale=1.0):
    """max |x - ref| / max |ref|. Where the exact answer is identically zero (dq and dk with a single key: the
    softmax is constant and the gradient a sum of terms that cancel exactly) relative error is undefined; the error
    is then measured against ``zero_scale``, the size of those terms (1: unit-scale inputs)."""
    err = (x.double() - ref).abs().max()
    scale = ref.abs().max()
    return float(err / scale) if scale > 1e-12 else float(err / zero_scale)


def make_qkv(b, tq, tk, hq, hkv, d, dv, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, tk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, tk, hkv, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def build_mask(kind, b, tq, tk, hq, seed=0):
    """A mask argument of the given kind, plus the batch size it needs (document masks pack into B = 1)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return {}
    if kind == "causal":
        return dict(causal=True)
    if kind == "padding":
        lengths = torch.randint(0, tk + 1, (b,), generator=g)
        lengths[0] = 0  # always one fully masked batch row
        return dict(mask=masks.padding(lengths))
    if kind == "document":
        cuts = sorted(torch.randint(0, tk + 1, (3,), generator=g).tolist())
        return dict(mask=masks.document(torch.tensor([0, *cuts, tk])))
    if kind == "prefix_lm":
        return dict(mask=masks.prefix_lm(int(torch.randint(0, tk + 1, (1,), generator=g))), causal=True)
    if kind == "tensor":
        return dict(mask=torch.rand(b, hq, tq, tk, generator=g) < 0.6)
    if kind == "padding&causal|prefix":
        lengths = torch.randint(0, tk + 1, (b,), generator=g)
        return dict(mask=(masks.padding(lengths) & masks.causal()) | masks.prefix_lm(2))
    if kind == "bias":
        return dict(bias=torch.randn(1, hq, tq, tk, generator=g, dtype=torch.float64), causal=True)
    if kind == "softcap":
        return dict(softcap=2.5, causal=True)
    raise AssertionError(kind)


MASK_KINDS = ["none", "causal", "padding", "document", "prefix_lm", "tensor", "padding&causal|prefix", "bias",
              "softcap"]


def run_with_grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do.to(o.dtype))
    return o.detach(), q.grad, k.grad, v.grad


def compare_to_naive(backend_fn, b, tq, tk, hq, hkv, d, dv, kind, *, seed=0, grads=True):
    if kind == "document":
        b, tq = 1, tk
    q, k, v = make_qkv(b, tq, tk, hq, hkv, d, dv, dtype=torch.float64, seed=seed)
    opts = build_mask(kind, b, tq, tk, hq, seed=seed)
    do = torch.randn(b, tq, hq, dv, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    ref = run_with_grads(lambda *x: softmax_attention(*x, backend="naive", **opts), q, k, v, do)
    opts32 = {n: (o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o) for n, o in opts.items()}
    f32 = (q.float(), k.float(), v.float())
    if not grads:
        with torch.no_grad():
            out = backend_fn(*f32, **opts32)
        assert rel_err(out, ref[0]) <= TOL
        return
    got = run_with_grads(lambda *x: backend_fn(*x, **opts32), *f32, do.float())
    # The bar is TOL for every output and gradient. dq and dk are sums of terms that cancel when a row's softmax is
    # (nearly) constant; where the exact answer is identically zero (a single kept key) the error is measured
    # against the size of those terms (zero_scale). An adaptive bar (4x the error of the naive path in fp32) was
    # tried and never rose above TOL in 750 random cases of these shapes, so it is not used.
    # each cancelling term ds_ij q_i (or ds_ij k_j) is bounded by 2 scale |do_i| |v_j| max |q|, |k|
    sc = opts.get("scale") or d ** -0.5
    zero_scale = float(2 * sc * do.norm(dim=-1).max() * v.norm(dim=-1).max() * max(q.abs().max(), k.abs().max()))
    for name, x, r in zip(("o", "dq", "dk", "dv"), got, ref):
        assert x.dtype == torch.float32
        err = rel_err(x, r, zero_scale=zero_scale)
        assert err <= TOL, f"{name}: relative error {err:.2e} > {TOL:.0e}"


SHAPES = st.fixed_dictionaries({
    "b": st.sampled_from([1, 2]),
    "tq": st.sampled_from([1, 7, 63]) | st.integers(1, 80),
    "tk": st.sampled_from([1, 7, 63]) | st.integers(1, 80),
    "hkv": st.sampled_from([1, 2]),
    "ratio": st.sampled_from([1, 2, 4]),
    "d": st.sampled_from([60, 100, 16]),
    "dv": st.sampled_from([60, 100, 24]),
    "kind": st.sampled_from(MASK_KINDS),
    "seed": st.integers(0, 2**16),
})


def _unpack(s):
    return s["b"], s["tq"], s["tk"], s["hkv"] * s["ratio"], s["hkv"], s["d"], s["dv"], s["kind"]


def sdpa_backend(q, k, v, **opts):
    if "softcap" in opts:  # SDPA cannot softcap; auto must route around it
        return softmax_attention(q, k, v, backend="auto", **opts)
    return softmax_attention(q, k, v, backend="sdpa", **opts)


@given(SHAPES)
def test_sdpa_matches_naive(s):
    compare_to_naive(sdpa_backend, *_unpack(s), seed=s["seed"])


@given(SHAPES)
def test_auto_matches_naive(s):
    compare_to_naive(lambda *x, **o: softmax_attention(*x, backend="auto", **o), *_unpack(s), seed=s["seed"])


@given(SHAPES, st.integers(1, 16), st.integers(1, 16), st.sampled_from([1, 3, 8]))
def test_tiled_matches_naive(s, block_q, block_k, chunk_blocks):
    """Small blocks so that odd lengths cut tiles in every place; chunks merge up to ``chunk_blocks`` blocks."""
    b, _, _, hq = _unpack(s)[:4]

    def tiled(q, k, v, **opts):
        # route through softmax_attention's validation, then call the tiled kernel with test-sized blocks
        def small_blocks(q, k, v, **kw):
            return tiled_attention(q, k, v, block_q=block_q, block_k=block_k,
                                   tile_elems=q.shape[0] * q.shape[2] * block_q * block_k * chunk_blocks, **kw)

        sa = importlib.import_module("hybridattn.ops.softmax_attention")  # the package re-exports the function
        saved = sa.BACKENDS["tiled"]
        sa.BACKENDS["tiled"] = small_blocks
        try:
            return softmax_attention(q, k, v, backend="tiled", **opts)
        finally:
            sa.BACKENDS["tiled"] = saved

    compare_to_naive(tiled, *_unpack(s), seed=s["seed"])


@pytest.mark.parametrize("backend", ["sdpa", "tiled", "auto"])
@pytest.mark.parametrize("kind", ["causal", "padding", "document"])
def test_long_odd_length_1000(backend, kind):
    compare_to_naive(lambda *x, **o: softmax_attention(*x, backend=backend, **o), 1, 1000, 1000, 2, 1, 60, 60, kind)


def test_cross_attention_causal_is_bottom_right():
    q, k, v = make_qkv(1, 3, 5, 1, 1, 8, 8, dtype=torch.float64)
    _, w = softmax_attention(q, k, v, causal=True, return_weights=True)
    # query i sees keys j <= i + Tk - Tq = i + 2
    assert torch.equal(w[0, 0] > 0, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool())


@pytest.mark.parametrize("backend", ["naive", "sdpa", "tiled", "auto"])
def test_fully_masked_rows_give_zeros_and_zero_grads(backend):
    # Tq > Tk with causal: the first Tq - Tk query rows see no key at all
    q, k, v = make_qkv(2, 6, 4, 2, 1, 16, 8)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    o = softmax_attention(q, k, v, causal=True, mask=masks.padding([4, 0]), backend=backend)
    assert torch.isfinite(o).all()
    assert torch.equal(o[:, :2], torch.zeros_like(o[:, :2]))
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    o.sum().backward()
    assert torch.equal(q.grad[:, :2], torch.zeros_like(q.grad[:, :2]))
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1])) and torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_return_weights_are_the_softmax():
    q, k, v = make_qkv(1, 2, 3, 1, 1, 4, 4, dtype=torch.float64)
    o, w = softmax_attention(q, k, v, scale=0.5, return_weights=True)
    s = 0.5 * torch.einsum("bqhd,bkhd->bhqk", q, k)
    expected = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(o, torch.einsum("bhqk,bkhd->bqhd", expected, v), rtol=1e-12, atol=0)


def test_hand_computed_two_keys():
    # logits 0 and log(3) -> weights 1/4 and 3/4
    q = torch.tensor([[[[1.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.0]], [[math.log(3.0)]]]], dtype=torch.float64)
    v = torch.tensor([[[[4.0]], [[8.0]]]], dtype=torch.float64)
    for backend in ("naive", "sdpa", "tiled"):
        o = softmax_attention(q, k, v, scale=1.0, backend=backend)
        assert abs(float(o) - 7.0) < 1e-12, backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["naive", "sdpa", "tiled", "auto"])
def test_half_precision_accumulates_in_fp32(dtype, backend):
    q, k, v = make_qkv(1, 65, 65, 2, 1, 64, 64, dtype=dtype)
    ref = softmax_attention(q.double(), k.double(), v.double(), causal=True, backend="naive")
    o = softmax_attention(q, k, v, causal=True, backend=backend)
    assert o.dtype == dtype
    # rounding the output to the half format dominates: one unit in the last place of |o| <= ~3
    assert rel_err(o, ref) <= 2 * torch.finfo(dtype).eps


def test_auto_policy():
    big = torch.empty(1, 32768, 1, 64)
    assert choose_backend(big, big, mask=masks.causal(), bias=None, softcap=None) == "sdpa"
    # Dv != D sends SDPA to its math kernel, which would build T x T
    assert choose_backend(big, big, big[..., :32], mask=None, bias=None, softcap=None) == "tiled"
    # a mask SDPA would need densely: a block-skipping backend (tiled, or block_sparse where it registers itself)
    assert choose_backend(big, big, mask=masks.padding([5]), bias=None, softcap=None) in ("tiled", "block_sparse")
    assert choose_backend(big, big, mask=None, bias=None, softcap=3.0) == "tiled"
    small = torch.empty(1, 64, 2, 64)
    assert choose_backend(small, small, mask=masks.padding([5]), bias=None, softcap=None) == "sdpa"
    assert choose_backend(small, small, mask=None, bias=None, softcap=3.0) == "naive"
    assert 64 * 64 * 2 <= DENSE_LIMIT < 32768**2
    # below DENSE_LIMIT a sparse spec goes to block_sparse once the sequence is long enough that skipping tiles
    # beats SDPA over a dense mask (AUTO_MIN_LENGTH_VS_SDPA, measured by hybridattn.bench.auto_policy)
    window = masks.sliding_window(64) & masks.causal()
    for t, want in ((128, "sdpa"), (255, "sdpa"), (256, "block_sparse"), (1024, "block_sparse")):
        x = torch.empty(1, t, 16, 64)
        assert x.shape[0] * x.shape[2] * t * t <= DENSE_LIMIT
        assert choose_backend(x, x, mask=window, bias=None, softcap=None) == want, t
    x = torch.empty(1, 1024, 16, 64)
    # a bias or softcap, a dense-ish spec, or a tensor mask keep the dense paths
    assert choose_backend(x, x, mask=window, bias=TensorBias(torch.zeros(1, 1, 1024, 1024)), softcap=None) == "sdpa"
    assert choose_backend(x, x, mask=window, bias=None, softcap=2.0) == "naive"
    assert choose_backend(x, x, mask=masks.padding([1000]), bias=None, softcap=None) == "sdpa"
    tensor_mask = masks.as_mask_spec(torch.ones(1, 1, 1024, 1024, dtype=torch.bool))
    assert choose_backend(x, x, mask=tensor_mask, bias=None, softcap=None) == "sdpa"


@pytest.mark.parametrize(
    "change, err, match",
    [
        (dict(q=torch.randn(2, 5, 4)), ValueError, "q: expected 4 dimensions"),
        (dict(k=torch.randn(2, 5, 3, 8), v=torch.randn(2, 5, 3, 8)), ValueError, "q: expected a head count divisible"),
        (dict(k=torch.randn(2, 5, 2, 7)), ValueError, "k: expected"),
        (dict(v=torch.randn(2, 6, 2, 8)), ValueError, "v: expected"),
        (dict(v=torch.randn(2, 5, 2, 8, dtype=torch.float64)), TypeError, "v: expected dtype"),
        (dict(q=torch.ones(2, 5, 4, 8, dtype=torch.long)), TypeError, "q: expected a floating-point"),
        (dict(mask=torch.ones(2, 4, 5, 5)), TypeError, "mask: expected a torch.bool"),
        (dict(mask=torch.ones(2, 4, 3, 5, dtype=torch.bool)), ValueError, "mask: expected the last two"),
        (dict(mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask: expected 2 to 4 dimensions"),
        (dict(mask=masks.padding([5, 5, 5])), ValueError, "mask: expected batch size 2"),
        (dict(mask=masks.padding([5, 9])), ValueError, "lengths: expected values in"),
        (dict(mask=masks.document([0, 2, 4])), ValueError, "cu_seqlens: expected"),
        (dict(mask="causal"), TypeError, "mask: expected a MaskSpec"),
        (dict(bias=torch.randn(2, 4, 5, 4)), ValueError, "bias: expected the last two"),
        (dict(bias=torch.randn(3, 1, 5, 5)), ValueError, "bias: expected batch size 2"),
        (dict(bias=3.0), TypeError, "bias: expected a ScoreBias"),
        (dict(backend="flash"), ValueError, "backend: expected one of"),
        (dict(softcap=0.0), ValueError, "softcap: expected a finite float > 0"),
        (dict(scale="1"), TypeError, "scale: expected a float"),
        (dict(causal=1), TypeError, "causal: expected a bool"),
        (dict(return_weights=True, backend="sdpa"), ValueError, "return_weights"),
        (dict(softcap=2.0, backend="sdpa"), ValueError, "softcap: the sdpa backend"),
    ],
)
def test_validation(change, err, match):
    args = dict(q=torch.randn(2, 5, 4, 8), k=torch.randn(2, 5, 2, 8), v=torch.randn(2, 5, 2, 8))
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(err, match=match):
        softmax_attention(q, k, v, **args)


def test_empty_keys_give_zeros():
    q, k, v = make_qkv(1, 3, 0, 2, 2, 8, 5)
    o = softmax_attention(q, k, v)
    assert o.shape == (1, 3, 2, 5) and torch.equal(o, torch.zeros_like(o))


@pytest.mark.parametrize("bias_shape", [(1, 4, 9, 13), (2, 1, 9, 1), (2, 4, 9, 13)])
def test_tiled_bias_gradients_match_naive(bias_shape):
    q, k, v = make_qkv(2, 9, 13, 4, 2, 12, 5, dtype=torch.float64)
    bias = torch.randn(bias_shape, dtype=torch.float64)
    do = torch.randn(2, 9, 4, 5, dtype=torch.float64)
    grads = []
    for fn in (naive_attention, lambda *x, **o: tiled_attention(*x, block_q=4, block_k=4, tile_elems=64, **o)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        o = fn(*leaves[:3], mask=Causal(), bias=TensorBias(leaves[3]), scale=0.4, softcap=3.0)
        grads.append(torch.autograd.grad(o, leaves, do))
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads[1], grads[0]):
        assert rel_err(g, r) <= 1e-12, name


class _CountingCausal(Causal):
    def __init__(self):
        self.tiles = []

    def dense_block(self, q_len, kv_len, q_start, q_end, k_start, k_end, *, device=None):
        self.tiles.append((q_start, k_start))
        return super().dense_block(q_len, kv_len, q_start, q_end, k_start, k_end, device=device)


def test_tiled_masks_only_partial_tiles_and_merges_full_ones():
    spec = _CountingCausal()
    q, k, v = make_qkv(1, 32, 32, 1, 1, 8, 8)
    tiled_attention(q, k, v, mask=spec, bias=None, scale=1.0, softcap=None, block_q=8, block_k=8, tile_elems=10**6)
    assert spec.tiles == [(0, 0), (8, 8), (16, 16), (24, 24)]  # the diagonal, nothing above or below


def test_tiled_never_reads_keys_in_empty_blocks():
    q, k, v = make_qkv(2, 20, 40, 2, 2, 8, 8)
    ref = naive_attention(q, k, v, mask=masks.padding([16, 8]), bias=None, scale=0.3, softcap=None)
    k[:, 16:], v[:, 16:] = float("nan"), float("nan")  # key blocks 2..4 (block_k = 8) are EMPTY for every row
    o = tiled_attention(q, k, v, mask=masks.padding([16, 8]), bias=None, scale=0.3, softcap=None,
                        block_q=8, block_k=8)
    assert rel_err(o, ref.double()) <= TOL


def _tiled_peak(t, *, backward, **blocks):
    q, k, v = make_qkv(1, t, t, 1, 1, 64, 64)
    q, k, v = (x.requires_grad_(backward) for x in (q, k, v))

    def run():
        o = tiled_attention(q, k, v, mask=Causal(), bias=None, scale=0.125, softcap=None, **blocks)
        if backward:
            o.sum().backward()

    return peak_memory(run, device="cpu")


def test_tiled_memory_grows_linearly_with_length():
    # small tiles so that short sequences already show the O(T * block) behaviour: doubling T doubles the peak
    blocks = dict(block_q=64, block_k=64, tile_elems=2**16)
    small, large = _tiled_peak(1024, backward=True, **blocks), _tiled_peak(2048, backward=True, **blocks)
    assert large / small < 2.5, f"peak grew {large / small:.2f}x when T doubled"
    assert large < 2048 * 2048 * 4 / 4, f"peak {large / 2**20:.1f} MiB vs the 16 MiB matrix"


@pytest.mark.slow
def test_tiled_memory_with_default_tiles_is_far_below_the_matrix():
    t = 8192
    peak = _tiled_peak(t, backward=True)
    assert peak < t * t * 4 / 8, f"peak {peak / 2**20:.1f} MiB vs the {t * t * 4 / 2**20:.0f} MiB matrix"


def test_flex_refuses_gradients_on_cpu_before_compiling():
    q, k, v = make_qkv(1, 5, 5, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="backend: 'flex' is inference-only on the CPU"):
        softmax_attention(q.requires_grad_(True), k, v, backend="flex")


@pytest.mark.slow
def test_flex_under_no_grad_accepts_inputs_that_require_grad():
    """The library's own advice for CPU flex (run under no_grad) must work with leaves that require grad: torch's
    flex_attention rejects such CPU inputs whatever the grad mode, so the backend passes them detached."""
    q, k, v = (x.requires_grad_(True) for x in make_qkv(1, 9, 9, 4, 2, 8, 8))
    with torch.no_grad():
        o = softmax_attention(q, k, v, mask=masks.sliding_window(2), backend="flex")
    ref = softmax_attention(q.double(), k.double(), v.double(), mask=masks.sliding_window(2), backend="naive")
    assert rel_err(o, ref.detach()) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_flex_matches_naive(kind):
    """Inference only (no CPU backward); each case compiles a kernel, hence slow."""
    compare_to_naive(lambda *x, **o: softmax_attention(*x, backend="flex", **o), 2, 37, 45, 4, 2, 60, 24, kind,
                     grads=False)


@pytest.mark.slow
def test_flex_fully_masked_rows_give_zeros():
    q, k, v = make_qkv(1, 6, 4, 2, 1, 16, 8)
    o = softmax_attention(q, k, v, causal=True, backend="flex")
    assert torch.equal(o[:, :2], torch.zeros_like(o[:, :2]))
    ref = softmax_attention(q.double(), k.double(), v.double(), causal=True, backend="naive")
    assert rel_err(o, ref) <= TOL


@pytest.mark.slow
def test_flex_keeps_compiling_past_dynamos_default_recompile_limit():
    import warnings

    q, k, v = make_qkv(1, 16, 16, 1, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="flex_attention called without torch.compile")
        for n in range(9):  # nine different mask_mods -> nine kernels, one past the default limit
            o = softmax_attention(q, k, v, mask=masks.prefix_lm(n) & masks.padding([16 - n]), backend="flex")
            ref = softmax_attention(q.double(), k.double(), v.double(), backend="naive",
                                    mask=masks.prefix_lm(n) & masks.padding([16 - n]))
            assert rel_err(o, ref) <= TOL


def test_masks_and_biases_of_fewer_dimensions_broadcast_as_in_pytorch():
    q = torch.randn(2, 5, 2, 8, dtype=torch.float64)
    bias = torch.randn(2, 5, 5, dtype=torch.float64)                     # [H, Tq, Tk]
    keep = torch.rand(5, 5) > 0.3                                        # [Tq, Tk]
    keep[:, 0] = True
    want = softmax_attention(q, q, q, bias=bias[None], mask=keep[None, None], backend="naive")
    for backend in ("naive", "sdpa", "tiled", "auto"):
        torch.testing.assert_close(softmax_attention(q, q, q, bias=bias, mask=keep, backend=backend), want,
                                   rtol=1e-12, atol=1e-12)  # float64 backends vs the float64 reference
    with pytest.raises(ValueError, match="bias: expected 2 to 4 dimensions"):
        softmax_attention(q, q, q, bias=torch.randn(5))
