"""Gated delta rule and delta rule: every form against the float64 token-loop reference, outputs, final states
and the gradients of every input; varlen, decoding hand-off, stress, and transformers' Qwen3-Next as an
independent implementation."""

from __future__ import annotations

import inspect
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from hybridattn.ops import (
    delta_rule,
    gated_delta_rule,
    naive_recurrent_delta_rule,
    naive_recurrent_gated_delta_rule,
)

from hybridattn.ops import _native

FORMS = ("chunk", "parallel", "recurrent")


# Every test runs twice: with the compiled CPU kernel (ops/csrc) and with the pure-PyTorch forms.
pytestmark = pytest.mark.usefixtures("kernel")


def test_native_kernel_builds(kernel):
    """Where a C++ compiler exists the kernel must build: otherwise every "native" case above would silently test
    the PyTorch forms twice."""
    if kernel == "torch" or shutil.which("c++") is None or os.environ.get("HYBRIDATTN_NATIVE") == "0":
        pytest.skip("no C++ compiler on PATH, or HYBRIDATTN_NATIVE=0: the ops use the PyTorch forms")
    assert _native.native_ops("gated_delta") is not None


def make_inputs(b, t, hk, hv, dk, dv, *, dtype=torch.float64, gated=True, state=True, g_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": rnd(b, t, hk, dk),
        # Unit-norm keys and beta in (0, 1) keep the delta rule a contraction, as in every model that uses it.
        "k": F.normalize(rnd(b, t, hk, dk), dim=-1),
        "v": rnd(b, t, hv, dv),
        "g": F.logsigmoid(rnd(b, t, hv) + 2.0) * g_scale if gated else None,
        "beta": torch.sigmoid(rnd(b, t, hv)),
        "initial_state": rnd(b, hv, dk, dv) * 0.5 if state else None,
    }
    return {name: None if x is None else x.to(dtype) for name, x in inputs.items()}


def run(fn, inputs, *, grads=True, **options):
    """Run ``fn`` on leaf copies of ``inputs``; return (o, final_state, {name: grad}) under a fixed random loss."""
    leaves = {n: x.detach().clone().requires_grad_(grads) for n, x in inputs.items() if x is not None}
    args = {n: leaves.get(n) for n in inputs}
    o, s = fn(
        args["q"], args["k"], args["v"], args["g"], args["beta"],
        initial_state=args["initial_state"], output_final_state=True, **options,
    )
    if not grads:
        return o, s, {}
    gen = torch.Generator().manual_seed(1)
    # Weights drawn in float64 then cast, so every dtype sees the same loss.
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)).sum()
    names = list(leaves)
    return o, s, dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_all_close(got, want, *, atol=None, rel=None):
    (o, s, gr), (o_ref, s_ref, gr_ref) = got, want
    pairs = [("o", o, o_ref), ("final_state", s, s_ref)] + [(f"grad {n}", gr[n], gr_ref[n]) for n in gr_ref]
    for name, a, b in pairs:
        if atol is not None:
            err = (a.double() - b.double()).abs().max().item()
            assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"
        if rel is not None:
            err = rel_err(a, b)
            assert err <= rel, f"{name}: relative error {err:.3g} > {rel}"


SHAPES = [  # (B, T, Hk, Hv, Dk, Dv, chunk_size)
    pytest.param((1, 1, 1, 1, 12, 20, 16), id="B1-T1-H1-Dk12-Dv20"),
    pytest.param((2, 63, 2, 4, 12, 20, 16), id="B2-T63-Hk2-Hv4-Dk12-Dv20-C16"),
    pytest.param((1, 100, 2, 2, 20, 12, 32), id="B1-T100-H2-Dk20-Dv12-C32"),
    pytest.param((1, 500, 1, 3, 12, 12, 64), id="B1-T500-Hk1-Hv3-D12-C64"),
]


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "delta"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", FORMS)
def test_forms_match_reference_float64(mode, shape, gated):
    b, t, hk, hv, dk, dv, c = shape
    inputs = make_inputs(b, t, hk, hv, dk, dv, gated=gated)
    want = run(naive_recurrent_gated_delta_rule, inputs)
    got = run(gated_delta_rule, inputs, mode=mode, chunk_size=c)
    assert_all_close(got, want, atol=1e-10)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "delta"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["chunk", "parallel"])
def test_inference_path_matches_reference_float64(mode, shape, gated):
    """Without gradients the chunk form updates its state and output in place: same numbers as the reference."""
    b, t, hk, hv, dk, dv, c = shape
    inputs = make_inputs(b, t, hk, hv, dk, dv, gated=gated)
    o_ref, s_ref, _ = run(naive_recurrent_gated_delta_rule, inputs, grads=False)
    with torch.no_grad():
        o, s, _ = run(gated_delta_rule, inputs, grads=False, mode=mode, chunk_size=c)
    assert (o - o_ref).abs().max().item() <= 1e-10
    assert (s - s_ref).abs().max().item() <= 1e-10
    h0 = inputs["initial_state"].clone()
    with torch.no_grad():
        gated_delta_rule(*(inputs[n] for n in ("q", "k", "v", "g", "beta")), initial_state=inputs["initial_state"],
                         mode=mode, chunk_size=c)
    assert torch.equal(inputs["initial_state"], h0)  # the caller's state is not updated in place


@pytest.mark.slow
def test_forms_match_reference_float64_long():
    """T=1000 (not a multiple of 64), Dk=60, Dv=100, GVA; the reference is computed once for the three forms."""
    inputs = make_inputs(1, 1000, 2, 4, 60, 100, state=True)
    want = run(naive_recurrent_gated_delta_rule, inputs)
    for mode in FORMS:
        assert_all_close(run(gated_delta_rule, inputs, mode=mode, chunk_size=64), want, atol=1e-10)


@pytest.mark.parametrize("mode", FORMS)
def test_forms_match_reference_float32(mode):
    """fp32 forms against the float64 reference on the same values: relative (norm) error <= 1e-5."""
    inputs = make_inputs(2, 77, 2, 4, 20, 12)
    want = run(naive_recurrent_gated_delta_rule, inputs)
    got = run(gated_delta_rule, {n: None if x is None else x.float() for n, x in inputs.items()}, mode=mode)
    assert got[0].dtype == torch.float32
    assert_all_close(got, want, rel=1e-5)


@pytest.mark.parametrize("mode", FORMS)
def test_delta_rule_is_gated_delta_rule_without_decay(mode):
    inputs = make_inputs(2, 40, 2, 2, 12, 20, gated=False)
    args = (inputs["q"], inputs["k"], inputs["v"])
    options = dict(initial_state=inputs["initial_state"], output_final_state=True)
    o, s = delta_rule(*args, inputs["beta"], mode=mode, chunk_size=16, **options)
    o_ref, s_ref = naive_recurrent_delta_rule(*args, inputs["beta"], **options)
    zero_g = torch.zeros(2, 40, 2, dtype=torch.float64)
    o_gated, s_gated = gated_delta_rule(*args, zero_g, inputs["beta"], mode=mode, chunk_size=16, **options)
    for a in (o, o_gated):
        assert (a - o_ref).abs().max().item() <= 1e-10
    for a in (s, s_gated):
        assert (a - s_ref).abs().max().item() <= 1e-10


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_prefill_then_recurrent_steps_equals_one_pass(chunk_size):
    inputs = make_inputs(2, 50, 2, 4, 12, 20)
    q, k, v, g, beta, h0 = (inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    o_full, s_full = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    split = 41
    o_pre, s = gated_delta_rule(
        q[:, :split], k[:, :split], v[:, :split], g[:, :split], beta[:, :split], initial_state=h0,
        output_final_state=True, chunk_size=chunk_size,
    )
    outs = [o_pre]
    for i in range(split, 50):
        sl = slice(i, i + 1)
        o_i, s = gated_delta_rule(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=s, output_final_state=True,
            mode="recurrent",
        )
        outs.append(o_i)
    assert (torch.cat(outs, 1) - o_full).abs().max().item() <= 1e-10
    assert (s - s_full).abs().max().item() <= 1e-10


@pytest.mark.parametrize("mode", FORMS)
def test_varlen_equals_per_sequence_calls(mode):
    bounds = [0, 7, 7, 40, 63]  # includes an empty sequence
    cu = torch.tensor(bounds, dtype=torch.int32)
    inputs = make_inputs(1, 63, 2, 4, 12, 20, state=False)
    h0 = make_inputs(4, 1, 2, 4, 12, 20, seed=3)["initial_state"]
    packed = dict(inputs, initial_state=h0)
    o, s, grads = run(gated_delta_rule, packed, mode=mode, chunk_size=16, cu_seqlens=cu)
    o_parts, s_parts = [], []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = {n: inputs[n][:, lo:hi] for n in ("q", "k", "v", "g", "beta")}
        o_i, s_i = naive_recurrent_gated_delta_rule(
            *part.values(), initial_state=h0[i : i + 1], output_final_state=True
        )
        o_parts.append(o_i)
        s_parts.append(s_i)
    assert (o - torch.cat(o_parts, 1)).abs().max().item() <= 1e-10
    assert (s - torch.cat(s_parts, 0)).abs().max().item() <= 1e-10
    # Gradients reach every packed token and every sequence's initial state.
    assert grads["initial_state"][1].abs().sum() > 0 and grads["q"].abs().sum() > 0


def test_varlen_gradients_equal_per_sequence_gradients():
    bounds = [0, 20, 45]
    cu = torch.tensor(bounds)
    inputs = make_inputs(1, 45, 1, 2, 12, 12, state=False)
    h0 = make_inputs(2, 1, 1, 2, 12, 12, seed=5)["initial_state"]
    _, _, grads = run(gated_delta_rule, dict(inputs, initial_state=h0), cu_seqlens=cu, chunk_size=16)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = {n: inputs[n][:, lo:hi] for n in ("q", "k", "v", "g", "beta")}
        part["initial_state"] = h0[i : i + 1]
        # The same fixed loss weights, sliced: rebuild them exactly as `run` draws them.
        gen = torch.Generator().manual_seed(1)
        w_o = torch.randn(1, 45, 2, 12, generator=gen, dtype=torch.float64)[:, lo:hi]
        w_s = torch.randn(2, 2, 12, 12, generator=gen, dtype=torch.float64)[i : i + 1]
        leaves = {n: x.clone().requires_grad_() for n, x in part.items()}
        o, s = naive_recurrent_gated_delta_rule(
            *(leaves[n] for n in ("q", "k", "v", "g", "beta")), initial_state=leaves["initial_state"],
            output_final_state=True,
        )
        ref = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), list(leaves.values()))
        for (name, _), r in zip(leaves.items(), ref):
            got = grads[name][i : i + 1] if name == "initial_state" else grads[name][:, lo:hi]
            assert (got - r).abs().max().item() <= 1e-10, name


def test_use_qk_l2norm_normalises_inside():
    inputs = make_inputs(1, 30, 2, 2, 12, 12)
    raw = dict(inputs, q=inputs["q"] * 3.0, k=inputs["k"] * torch.linspace(0.5, 4.0, 30).view(1, 30, 1, 1))
    o, s = gated_delta_rule(
        raw["q"], raw["k"], raw["v"], raw["g"], raw["beta"], initial_state=raw["initial_state"],
        output_final_state=True, use_qk_l2norm=True,
    )
    eps_norm = lambda x: x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    o_ref, s_ref = naive_recurrent_gated_delta_rule(
        eps_norm(raw["q"]), eps_norm(raw["k"]), raw["v"], raw["g"], raw["beta"],
        initial_state=raw["initial_state"], output_final_state=True,
    )
    assert (o - o_ref).abs().max().item() <= 1e-10 and (s - s_ref).abs().max().item() <= 1e-10


def test_parallel_returns_the_implicit_attention_matrix():
    inputs = make_inputs(2, 33, 2, 4, 12, 20, state=False)
    q, k, v, g, beta = (inputs[n] for n in ("q", "k", "v", "g", "beta"))
    o, _, attn = gated_delta_rule(q, k, v, g, beta, mode="parallel", return_attention=True)
    assert attn.shape == (2, 4, 33, 33)
    assert (torch.einsum("bhts,bshd->bthd", attn, v) - o).abs().max().item() <= 1e-10
    assert attn.triu(1).abs().max().item() == 0.0  # causal
    # With packed sequences the matrix is block-diagonal and each block is the sequence's own matrix.
    cu = torch.tensor([0, 13, 33])
    _, _, packed = gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1], mode="parallel", return_attention=True,
                                    cu_seqlens=cu)
    _, _, first = gated_delta_rule(*(x[:1, :13] for x in (q, k, v, g, beta)), mode="parallel",
                                   return_attention=True)
    assert (packed[:, :, :13, :13] - first).abs().max().item() <= 1e-12
    assert packed[:, :, 13:, :13].abs().max().item() == 0.0


# -- stress ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g_scale", [0.0, 40.0], ids=["no-decay", "fast-decay"])
@pytest.mark.parametrize("mode", FORMS)
def test_extreme_gates_match_reference(mode, g_scale):
    """g = 0 (no forgetting) and g around -40 per token (exp underflows to 0 within a chunk)."""
    inputs = make_inputs(1, 70, 1, 2, 12, 12, g_scale=g_scale)
    if g_scale:
        inputs["g"] = inputs["g"] - 40.0
    want = run(naive_recurrent_gated_delta_rule, inputs)
    got = run(gated_delta_rule, inputs, mode=mode, chunk_size=32)
    for x in (got[0], got[1], *got[2].values()):
        assert torch.isfinite(x).all()
    assert_all_close(got, want, atol=1e-10)


def test_long_sequence_chunk_forward_is_finite():
    """T = 131,072 with strong decay: the cumulative log-decay reaches about -1e6 over the sequence, which would
    overflow exp() if it were not kept chunk-local."""
    t = 131_072
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, t, 1, 8, generator=gen)
    k = F.normalize(torch.randn(1, t, 1, 8, generator=gen), dim=-1)
    v = torch.randn(1, t, 1, 8, generator=gen)
    g = -8.0 * torch.rand(1, t, 1, generator=gen)
    beta = torch.rand(1, t, 1, generator=gen)
    with torch.no_grad():
        o, s = gated_delta_rule(q, k, v, g, beta, output_final_state=True, chunk_size=64)
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        # The tail depends only on recent tokens (strong decay): a recurrent pass over the last 256 tokens,
        # started from the chunk form's state there, must give the same outputs.
        cut = t - 256
        _, s_cut = gated_delta_rule(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut],
                                    output_final_state=True)
        tail = (x[:, cut:] for x in (q, k, v, g, beta))
        o_tail, s_tail = gated_delta_rule(*tail, initial_state=s_cut, output_final_state=True, mode="recurrent")
    assert rel_err(o[:, cut:], o_tail) <= 1e-5 and rel_err(s, s_tail) <= 1e-5


@pytest.mark.parametrize("mode", FORMS)
def test_bfloat16_within_tolerance_of_float32(mode):
    """bf16 inputs (state kept in fp32 inside) against fp32 on the same rounded values: only the output's
    rounding to bf16 differs, relative error <= 1e-2 (bf16 has an 8-bit mantissa: 2^-8 = 3.9e-3 per element)."""
    inputs = make_inputs(2, 45, 2, 4, 12, 20, dtype=torch.bfloat16)
    q, k, v, g, beta, h0 = (inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, mode=mode)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o32, s32 = gated_delta_rule(*(x.float() for x in (q, k, v, g, beta)), initial_state=h0.float(),
                                output_final_state=True, mode=mode)
    assert rel_err(o, o32) <= 1e-2 and rel_err(s, s32) <= 1e-5
    # And against the float64 computation on the unrounded inputs, the bf16 pipeline stays within 2e-2.
    ref = make_inputs(2, 45, 2, 4, 12, 20)
    o64, _ = naive_recurrent_gated_delta_rule(*(ref[n] for n in ("q", "k", "v", "g", "beta")),
                                              initial_state=ref["initial_state"])
    assert rel_err(o, o64) <= 2e-2


# -- an independent implementation: transformers' Qwen3-Next fallback --------------------------------------------
def _transformers_rules():
    mod = pytest.importorskip(
        "transformers.models.qwen3_next.modeling_qwen3_next",
        reason="transformers (with Qwen3-Next) is a test-only dependency: pip install .[test]",
    )
    # The public names dispatch to fla's Triton kernels when fla is installed; unwrap to the torch code.
    return inspect.unwrap(mod.torch_recurrent_gated_delta_rule), inspect.unwrap(mod.torch_chunk_gated_delta_rule)


@pytest.mark.needs_transformers
@pytest.mark.parametrize("l2norm", [False, True], ids=["raw-qk", "l2norm-qk"])
@pytest.mark.parametrize("mode", FORMS)
def test_matches_transformers_qwen3_next(mode, l2norm):
    """transformers computes in fp32, scales q by Dk^-0.5 (our default) and uses GVA by repeat_interleave."""
    tf_recurrent, tf_chunk = _transformers_rules()
    inputs = make_inputs(2, 70, 2, 4, 16, 24, dtype=torch.float32)
    q, k, v, g, beta, h0 = (inputs[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, mode=mode,
                            use_qk_l2norm=l2norm)
    for fn in (tf_recurrent, tf_chunk):
        o_tf, s_tf = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                        use_qk_l2norm_in_kernel=l2norm)
        assert rel_err(o, o_tf) <= 1e-5 and rel_err(s, s_tf) <= 1e-5


# -- validation --------------------------------------------------------------------------------------------------
def _valid():
    x = make_inputs(1, 8, 2, 4, 6, 5)
    return [x[n] for n in ("q", "k", "v", "g", "beta")]


@pytest.mark.parametrize(
    "change, options, error, match",
    [
        (lambda a: a.__setitem__(2, a[2][:, :, :3]), {}, ValueError, "v: expected a head count divisible"),
        (lambda a: a.__setitem__(1, a[1][..., :5]), {}, ValueError, "k: expected shape"),
        (lambda a: a.__setitem__(3, a[3][:, :, :2]), {}, ValueError, "g: expected shape"),
        (lambda a: a.__setitem__(4, a[4][0]), {}, ValueError, "beta: expected 3 dimensions"),
        (lambda a: a.__setitem__(2, a[2].float()), {}, TypeError, "v: expected dtype torch.float64"),
        (lambda a: None, {"mode": "fused"}, ValueError, "mode: expected one of"),
        (lambda a: None, {"chunk_size": 0}, ValueError, "chunk_size"),
        (lambda a: None, {"return_attention": True}, ValueError, "return_attention: expected mode='parallel'"),
        (lambda a: None, {"initial_state": torch.zeros(1, 4, 5, 6, dtype=torch.float64)}, ValueError,
         "initial_state: expected shape"),
        (lambda a: None, {"cu_seqlens": torch.tensor([0, 3, 9])}, ValueError, "cu_seqlens"),
        (lambda a: None, {"scale": "big"}, TypeError, "scale"),
    ],
    ids=["gva-heads", "k-shape", "g-shape", "beta-ndim", "v-dtype", "mode", "chunk-size", "attention-mode",
         "state-shape", "cu-seqlens", "scale-type"],
)
def test_validation_names_the_argument(change, options, error, match):
    args = _valid()
    change(args)
    with pytest.raises(error, match=match):
        gated_delta_rule(*args, **options)


def test_empty_sequence_returns_initial_state():
    args = [x[:, :0] for x in _valid()]
    h0 = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    for mode in FORMS:
        o, s = gated_delta_rule(*args, initial_state=h0, output_final_state=True, mode=mode)
        assert o.shape == (1, 0, 4, 5) and torch.equal(s, h0)
