"""Block-sparse kernel: outputs and gradients against the float64 dense masked reference."""

import shutil

import pytest
import torch

from hybridattn.ops import _native, masks
from hybridattn.ops.block_sparse_attention import (
    _native_forward, _shift_needed, block_sparse_attention, cached_plan, compiled_workspace_bytes, plan_blocks,
)
from hybridattn.ops.softmax_attention import softmax_attention


@pytest.fixture(params=["native", "torch"], autouse=True)
def kernel(request):
    """Every test runs twice: with the compiled CPU forward (``ops/csrc/block_sparse.cpp``) and with the PyTorch
    loop."""
    if request.param == "torch":
        with _native.disabled():
            yield request.param
    else:
        yield request.param


def test_native_kernel_builds(kernel):
    """Where a C++ compiler exists the kernel must build: otherwise every "native" case would silently test the
    PyTorch loop twice."""
    if kernel == "torch" or shutil.which("c++") is None or _native.os.environ.get("HYBRIDATTN_NATIVE") == "0":
        pytest.skip("no C++ compiler on PATH, or HYBRIDATTN_NATIVE=0: the ops use the PyTorch forms")
    assert _native.native_ops("block_sparse") is not None
    assert _native.native_ops("block_sparse_backward") is not None


def _reference(q, k, v, spec, scale=None):
    return softmax_attention(q.double(), k.double(), v.double(), mask=spec, scale=scale, backend="naive")


def _compare(spec, *, b=2, tq=45, tk=45, hq=4, hkv=2, d=12, dv=10, block_q=8, block_k=16, q_gain=None,
             dtype=torch.float32, fp32_bar=False):
    """Kernel vs the float64 reference, outputs and gradients; ``q_gain [Tq]`` scales the query rows (large
    logits). ``fp32_bar``: the bar for each tensor is 1e-5, or twice the error of an independent float32
    computation (the naive backend) where that is larger: for logits near the exp bound, where float32 rounding
    itself reaches 1e-5 of the float64 result."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(b, tq, hq, d, generator=gen)
    q = (q if q_gain is None else q * q_gain[:, None, None]).to(dtype).requires_grad_()
    k = torch.randn(b, tk, hkv, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(b, tk, hkv, dv, generator=gen).to(dtype).requires_grad_()
    out = block_sparse_attention(q, k, v, spec, block_q=block_q, block_k=block_k)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _reference(q64, k64, v64, spec)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    bars = [1e-5] * 4
    if fp32_bar:
        naive = softmax_attention(q, k, v, mask=spec, backend="naive")
        fp32 = (naive, *torch.autograd.grad(naive, (q, k, v), grad))
        bars = [1e-5 * max(1.0, 2 * float(((x.double() - w).abs() / (1e-5 + 1e-5 * w.abs())).max()))
                for x, w in zip(fp32, (ref, *want))]
    torch.testing.assert_close(out.double(), ref, rtol=bars[0], atol=bars[0])
    for name, a, w, bar in zip("qkv", got, want, bars[1:]):
        torch.testing.assert_close(a.double(), w, rtol=bar, atol=bar, msg=lambda m: f"d{name}: {m}")


SPECS = {
    "window-causal": lambda: masks.sliding_window(9) & masks.causal(),
    "window-both": lambda: masks.sliding_window(6, 3),
    "dilated": lambda: masks.dilated(20, 3) & masks.causal(),
    "strided": lambda: masks.strided(5) & masks.causal(),
    "fixed": lambda: masks.fixed(10, 2),
    "longformer-padding": lambda: masks.longformer(5, [0, 30]) & masks.padding(torch.tensor([45, 28])),
    "bigbird": lambda: masks.bigbird(1, 1, 2, block=8, seed=1),
    "bigbird-causal": lambda: masks.bigbird(1, 1, 2, block=8, seed=1) & masks.causal(),
    "global-document": lambda: masks.global_tokens([3]) & masks.document([0, 20, 45]),
}


@pytest.mark.parametrize("name", SPECS)
def test_matches_dense_reference_gqa_odd_lengths(name):
    spec = SPECS[name]()
    b = 1 if "document" in name else 2
    _compare(spec, b=b)


@pytest.mark.parametrize("threads", [1, 3, 7])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_any_thread_count_computes_every_block_once(threads, kv_heads):
    """Threads that finish their share take blocks from the others' (ops/csrc/work_sharing.h): with more threads
    than blocks, or shares that do not divide evenly, each block is still computed once, bit for bit as on one
    thread; so are the gradients. The backward's tasks are whole key heads (B * Hkv = 8), or, with MQA and B = 1,
    segments of one key head's blocks, whose dk / dv rows are summed in a fixed order."""
    spec = masks.longformer(5, [0, 30]) & masks.causal()
    gen = torch.Generator().manual_seed(3)
    b = 2 if kv_heads == 4 else 1
    q = torch.randn(b, 45, 4, 12, generator=gen).requires_grad_()
    k, v = (torch.randn(b, 45, kv_heads, 12, generator=gen).requires_grad_() for _ in range(2))
    grad = torch.randn(b, 45, 4, 12, generator=gen)

    def run():
        out = block_sparse_attention(q, k, v, spec, block_q=8, block_k=16)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = run()
        torch.set_num_threads(threads)
        got = run()
    finally:
        torch.set_num_threads(old)
    for a, w in zip(got, want):
        assert torch.equal(a, w)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _reference(q64, k64, v64, spec)
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-5, atol=1e-5)
    for a, w in zip(got[1:], torch.autograd.grad(ref, (q64, k64, v64), grad.double())):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4096, 8, 64, 64), (1, 8192, 16, 64, 40)])
def test_outputs_of_16_mib_and_more_match_the_pytorch_loop(kernel, shape):
    """From 16 MiB on, the compiled forward writes its output with streaming stores (whole lines; Dv = 40 leaves
    rows that start off a line, written as before). Too large for the dense reference: compared with the PyTorch
    loop, which the other tests hold to it."""
    if kernel == "torch":
        pytest.skip("compares the compiled forward with the PyTorch loop")
    b, t, h, d, dv = shape
    spec = masks.longformer(100, [0, 33]) & masks.causal()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, t, h, d, generator=gen)
    k = torch.randn(b, t, h // 2, d, generator=gen)
    v = torch.randn(b, t, h // 2, dv, generator=gen)
    got = block_sparse_attention(q, k, v, spec, block_q=64, block_k=64)
    with _native.disabled():
        want = block_sparse_attention(q, k, v, spec, block_q=64, block_k=64)
    assert got.numel() * got.element_size() >= 16 << 20
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["longformer-gqa", "bigbird-causal", "longformer-mqa"])
def test_compiled_backward_matches_the_pytorch_loop_at_production_tiles(kernel, name):
    """The compiled backward (ops/csrc/block_sparse_backward.cpp) against the PyTorch loop's gradients on 64-row
    blocks, global rows wider than a tile pass, GQA and two batch rows, or MQA with one (its key head split into
    segments whose dk / dv are summed after); the loop is held to the float64 reference by the other tests."""
    if kernel == "torch":
        pytest.skip("compares the compiled backward with the PyTorch loop")
    spec = {"longformer-gqa": masks.longformer(40, [0, 3, 200]) & masks.causal(),
            "bigbird-causal": masks.bigbird(1, 1, 2, block=64, seed=3, causal=True),
            "longformer-mqa": masks.longformer(40, [0, 3, 200]) & masks.causal()}[name]
    b, hkv = (1, 1) if name.endswith("mqa") else (2, 2)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(b, 389, 6, 40, generator=gen).requires_grad_()
    k = torch.randn(b, 389, hkv, 40, generator=gen).requires_grad_()
    v = torch.randn(b, 389, hkv, 24, generator=gen).requires_grad_()
    grad = torch.randn(b, 389, 6, 24, generator=gen)

    def grads():
        out = block_sparse_attention(q, k, v, spec, block_q=64, block_k=64)
        return torch.autograd.grad(out, (q, k, v), grad)

    got = grads()
    with _native.disabled():
        want = grads()
    for name_, a, w in zip("qkv", got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name_}: {m}")


def test_backward_reads_expanded_and_strided_output_gradients():
    """``out.sum()`` hands the backward an expanded gradient (strides 0) and a transposed gradient is strided: the
    compiled backward reads both as they are (no contiguous copy) and gets what a contiguous gradient gives."""
    spec = masks.sliding_window(6) & masks.causal()
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 37, 4, 12, generator=gen).requires_grad_() for _ in range(3))
    out = block_sparse_attention(q, k, v, spec, block_q=8, block_k=16)
    dense = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), retain_graph=True)
    expanded = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    grad = torch.randn(2, 4, 37, 12, generator=gen)
    strided = torch.autograd.grad(out, (q, k, v), grad.transpose(1, 2), retain_graph=True)
    contiguous = torch.autograd.grad(out, (q, k, v), grad.transpose(1, 2).contiguous())
    for a, b, c, d in zip(dense, expanded, strided, contiguous):
        assert torch.equal(a, b) and torch.equal(c, d)


def test_large_logits_use_the_shifted_exp_path_per_block():
    # logit bounds beyond EXP_SAFE in the second half of the queries: those blocks subtract the row maximum
    # (over kept keys only) before exp(), the others skip it; both must match the reference. (A gain of 10
    # keeps the problem well conditioned in fp32: at 40, fp32 SDPA itself misses 1e-5 on dk.)
    gain = torch.ones(45)
    gain[24:] = 10.0
    spec = masks.longformer(5, [0, 30]) & masks.padding(torch.tensor([45, 28]))
    q, k = torch.randn(2, 45, 4, 12) * gain[:, None, None], torch.randn(2, 45, 2, 12)
    shifted = _shift_needed(q, k, plan_blocks(spec, 45, 45, 8, 16), 12 ** -0.5)
    assert any(shifted) and not all(shifted)
    _compare(spec, q_gain=gain)
    _compare(masks.sliding_window(6, 3) & masks.causal(), q_gain=gain)


@pytest.mark.parametrize("name", ["bigbird-causal-padding", "longformer-dilated"])
def test_gathered_and_ranged_key_segments(name):
    # long enough for query blocks whose keys are several ranges (views of k) plus one gathered segment
    spec = {
        "bigbird-causal-padding": lambda: masks.bigbird(1, 1, 3, block=8, seed=4) & masks.causal()
        & masks.padding(torch.tensor([203, 150])),
        "longformer-dilated": lambda: masks.longformer(20, [0, 1, 100]) | masks.dilated(60, 16),
    }[name]()
    plan = plan_blocks(spec, 203, 203, 8, 8)
    kinds = {type(seg.keys) for blk in plan.blocks for seg in blk.segments}
    assert kinds == {slice, torch.Tensor}
    assert max(len(blk.segments) for blk in plan.blocks) >= 2
    _compare(spec, tq=203, tk=203, block_q=8, block_k=8)
    # every block shifted: logits near the exp bound, where the naive float32 backend itself measured up to 1.3x of
    # 1e-5 on dk (BigBird seeds 4-7); the bar follows it
    _compare(spec, tq=203, tk=203, block_q=8, block_k=8, q_gain=torch.full((203,), 6.0), fp32_bar=True)


def test_production_head_dims_and_tiles():
    # the compiled float kernel's register tiles: 64 query rows (4 vectors) and 16-row refined blocks, D = Dv = 64
    # (10 column tiles of 6 plus one of 4), key ranges whose widths leave remainders of each tile size, GQA
    spec = masks.longformer(37, [0, 1, 150]) & masks.padding(torch.tensor([300, 233]))
    _compare(spec, tq=300, tk=300, hq=4, hkv=2, d=64, dv=64, block_q=64, block_k=32)
    _compare(masks.bigbird(1, 1, 2, block=64, seed=3), b=1, tq=300, tk=300, hq=2, hkv=1, d=64, dv=61, block_q=64,
             block_k=64, q_gain=torch.full((300,), 4.0))


def test_register_tiles_on_dims_off_the_vector_width():
    # D = 24 and Dv = 40 leave partial 16-lane columns in the in-register transposes of Q and O; a window of
    # (37, 11) keys cuts 64-row blocks' edge tiles into triangles, computed per 16-row vector (a window's
    # diagonal key runs); 200 rows end on a 8-row block
    spec = masks.sliding_window(37, 11) & masks.padding(torch.tensor([200, 157]))
    _compare(spec, tq=200, tk=200, hq=6, hkv=2, d=24, dv=40, block_q=64, block_k=32)
    _compare(masks.longformer(21, [0, 130]), b=1, tq=150, tk=150, hq=3, hkv=3, d=17, dv=33, block_q=64,
             block_k=16)
    # the head-major copy of k and v streams whole 64-byte lines: Dv = 32 rows start off a line after 101 * 3 rows
    # of D = 20 (plain copies there), and on one after rows of D = 16
    _compare(masks.sliding_window(30, 30), b=1, tq=101, tk=101, hq=3, hkv=3, d=20, dv=32, block_q=64, block_k=32)
    _compare(masks.sliding_window(30, 30), b=1, tq=101, tk=101, hq=6, hkv=3, d=16, dv=48, block_q=64, block_k=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_max_shift_decided_per_head_and_block(dtype):
    # only key head 1's queries in rows 24.. have logits beyond EXP_SAFE: the compiled forward shifts just those
    # (batch row, key head, block) triples, the others keep m = 0, and the backward (which clamps to
    # [-EXP_SAFE, EXP_SAFE] after subtracting m) must still be exact for both kinds of rows in a shifted block
    gen = torch.Generator().manual_seed(11)
    spec = masks.longformer(5, [0, 30]) & masks.padding(torch.tensor([45, 28]))
    q = torch.randn(2, 45, 4, 12, generator=gen, dtype=dtype)
    q[:, 24:, 2:] *= 10.0  # query heads 2, 3 = key head 1 (GQA 2)
    k, v = torch.randn(2, 45, 2, 12, generator=gen, dtype=dtype), torch.randn(2, 45, 2, 10, generator=gen, dtype=dtype)
    plan = plan_blocks(spec, 45, 45, 8, 16)
    want_flags = _shift_needed(q, k, plan, 12 ** -0.5)
    assert any(want_flags) and not all(want_flags)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = block_sparse_attention(q, k, v, spec, block_q=8, block_k=16, plan=plan)
    native = _native_forward(q.detach(), k.detach(), v.detach(), plan, 12 ** -0.5)
    if native is not None:
        _, shift, _, flags = native
        assert flags == want_flags
        assert shift[:, 0].abs().max() == 0 and shift[:, 1].abs().max() > 0  # key head 0 never shifted
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _reference(q64, k64, v64, spec)
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    for name, a, w in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_compiled_forward_reports_its_workspace(kernel):
    # the compiled forward keeps k and v head-major between calls (not a torch allocation, so memory benchmarks
    # add what this reports): at least both tensors plus one norm per key row
    q, k, v = torch.randn(1, 100, 4, 16), torch.randn(1, 100, 2, 16), torch.randn(1, 100, 2, 8)
    out = block_sparse_attention(q, k, v, masks.sliding_window(5), block_q=16, block_k=16)
    torch.testing.assert_close(out.double(), _reference(q, k, v, masks.sliding_window(5)), rtol=1e-5, atol=1e-5)
    if kernel == "native" and _native.built("block_sparse") is not None:
        assert compiled_workspace_bytes() >= (k.numel() + v.numel() + 2 * 100) * 4


def test_float64_inputs():
    spec = masks.longformer(5, [0, 30]) & masks.padding(torch.tensor([45, 28]))
    _compare(spec, dtype=torch.float64)
    _compare(spec, dtype=torch.float64, q_gain=torch.full((45,), 12.0))  # shifted blocks


def test_wide_query_blocks_are_planned_with_finer_tiles():
    # the query block holding a global token reads every key block; with tiles of block_q // REFINE rows only
    # the global row's tile does, and the computed pairs drop accordingly
    spec = masks.longformer(4, [0, 150]) & masks.padding(torch.tensor([200, 170]))
    plan = plan_blocks(spec, 200, 200, 16, 8)
    assert sorted({grp.block_q for grp in plan.groups}) == [4, 16]
    fine = [grp for grp in plan.groups if grp.block_q == 4]
    assert sorted({qb // 4 for grp in fine for qb in grp.q_blocks.tolist()}) == [0, 9]  # rows 0 and 150
    # the two coarse blocks would compute 2 x 16 rows x 200 keys; their fine tiles at most half of it
    assert sum(grp.k_blocks.numel() for grp in fine) * 4 * 8 <= 16 * 200
    _compare(spec, tq=200, tk=200, block_q=16, block_k=8)


def test_per_head_layout_tiles_smaller_than_layout_blocks():
    gen = torch.Generator().manual_seed(3)
    layout = torch.rand(4, 6, 6, generator=gen) > 0.6
    layout |= torch.eye(6, dtype=torch.bool)
    _compare(masks.block_sparse(layout, block=8), tq=43, tk=43, hq=4, hkv=1, block_q=5, block_k=7)


def test_cross_attention_and_decode_lengths():
    _compare(masks.sliding_window(7) & masks.causal(), tq=9, tk=40)
    _compare(masks.sliding_window(7), tq=1, tk=33, block_q=4)


def test_no_mask_is_full_attention():
    _compare(None, tq=21, tk=30, block_q=16, block_k=16)


def test_fully_masked_rows_give_zero_output_and_gradient():
    spec = masks.sliding_window(3) & masks.causal()
    q = torch.randn(1, 20, 2, 8, requires_grad=True)  # Tq > Tk: the first 8 rows see no key
    k = torch.randn(1, 12, 2, 8, requires_grad=True)
    v = torch.randn(1, 12, 2, 8, requires_grad=True)
    out = block_sparse_attention(q, k, v, spec, block_q=4, block_k=4)
    out.sum().backward()
    assert torch.equal(out[:, :8], torch.zeros_like(out[:, :8]))
    assert torch.equal(q.grad[:, :8], torch.zeros_like(q.grad[:, :8]))
    torch.testing.assert_close(out[:, 8:].double(), _reference(q, k, v, spec)[:, 8:], rtol=1e-5, atol=1e-5)


def test_cost_scales_with_kept_pairs():
    t, w, blk = 4096, 256, 64
    spec = masks.sliding_window(w) & masks.causal()
    plan = plan_blocks(spec, t, t, blk, blk)
    kept = spec.kept_pairs(t, t)
    # each query block reads its own block and the w / blk blocks before it: kept pairs rounded up to tiles
    assert plan.computed_pairs() == t * blk * (w // blk + 1) - blk * blk * (w // blk) * (w // blk + 1) // 2
    assert plan.computed_pairs() < 1.3 * kept < 0.15 * t * t


def test_plan_reuse_and_validation():
    spec = masks.sliding_window(5)
    q = torch.randn(1, 30, 2, 8)
    plan = cached_plan(spec, 30, 30, 8, 8)
    assert cached_plan(spec, 30, 30, 8, 8) is plan
    out = block_sparse_attention(q, q, q, spec, block_q=8, block_k=8, plan=plan)
    torch.testing.assert_close(out.double(), _reference(q, q, q, spec), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="plan"):
        block_sparse_attention(q[:, :20], q[:, :20], q[:, :20], spec, block_q=8, block_k=8, plan=plan)
    with pytest.raises(ValueError, match="block_q"):
        block_sparse_attention(q, q, q, spec, block_q=0)
    with pytest.raises(ValueError, match="q: expected a head count"):
        block_sparse_attention(torch.randn(1, 30, 3, 8), q, q, spec)


def test_softmax_attention_backend_and_auto_dispatch():
    from hybridattn.ops.softmax_attention import choose_backend

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2100, 4, 16, generator=gen)  # above softmax_attention's DENSE_LIMIT
    k, v = torch.randn(1, 2100, 2, 16, generator=gen), torch.randn(1, 2100, 2, 16, generator=gen)
    spec = masks.sliding_window(100) & masks.causal()
    assert choose_backend(q, k, mask=spec, bias=None, softcap=None) == "block_sparse"
    assert choose_backend(q, k, mask=masks.sliding_window(2000), bias=None, softcap=None) != "block_sparse"
    ref = _reference(q, k, v, spec)
    torch.testing.assert_close(softmax_attention(q, k, v, mask=spec).double(), ref, rtol=1e-5, atol=1e-5)
    out = softmax_attention(q[:, :50], k[:, :50], v[:, :50], mask=masks.sliding_window(7), causal=True,
                            backend="block_sparse")
    torch.testing.assert_close(out.double(), _reference(q[:, :50], k[:, :50], v[:, :50],
                                                        masks.sliding_window(7) & masks.causal()),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_sparse"):
        softmax_attention(q[:, :8], k[:, :8], v[:, :8], softcap=5.0, backend="block_sparse")


@pytest.mark.slow
@pytest.mark.parametrize("block", [64, 128])
def test_long_sequences_with_production_tiles(block):
    spec = masks.longformer(100, [0, 500]) & masks.causal() | masks.bigbird(1, 1, 2, block=64, seed=2, causal=True)
    _compare(spec, b=1, tq=1001, tk=1001, hq=4, hkv=1, d=32, dv=32, block_q=block, block_k=block)


def test_backend_reuses_plans_of_equal_specs():
    from hybridattn.ops.block_sparse_attention import _PLANS_BY_REPR

    q = torch.randn(1, 40, 2, 8)
    outs = [softmax_attention(q, q, q, mask=masks.longformer(3, [1]), causal=True, backend="block_sparse")
            for _ in range(2)]
    keys = [key for key in _PLANS_BY_REPR if key[0] == repr(masks.causal() & masks.longformer(3, [1]))]
    assert len(keys) == 1 and keys[0][1:4] == (40, 40, 32)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    ref = _reference(q, q, q, masks.longformer(3, [1]) & masks.causal())
    torch.testing.assert_close(outs[0].double(), ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    # bf16 in and out, float32 inside: within bf16 rounding of a float32 run on the same (bf16) values; the
    # gradients' backward also reads the bf16-rounded output, so they are compared at their tensor's scale
    spec = masks.longformer(6, [0, 20]) & masks.causal()
    q, k, v = (torch.randn(2, 45, h, 12).to(torch.bfloat16).requires_grad_() for h in (4, 2, 2))
    grad = torch.randn(2, 45, 4, 12).to(torch.bfloat16)
    out = block_sparse_attention(q, k, v, spec, block_q=8, block_k=8)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = block_sparse_attention(q32, k32, v32, spec, block_q=8, block_k=8)
    want = torch.autograd.grad(ref, (q32, k32, v32), grad.float())
    assert out.dtype == torch.bfloat16 and all(x.dtype == torch.bfloat16 for x in got)
    assert ((out.float() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-6).all()
    for a, w in zip(got, want):
        assert (a.float() - w).abs().max() <= 2 ** -7 * w.abs().max()
