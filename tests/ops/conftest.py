"""Helpers shared by the ops tests, handed out as fixtures (test modules are imported by path, not as a package)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def run_form(fn, args, *, initial_state=None, dtype=None, grads=True, **options):
    """Run ``fn(*args, initial_state=..., output_final_state=True, **options)`` on leaf copies (cast to ``dtype``)
    and return ``{"o", "state", "grad0".., "grad_state"}`` under a fixed random loss on o and the final state."""
    leaves = [a.detach().to(dtype or a.dtype).requires_grad_(grads) for a in args]
    h0 = None if initial_state is None else initial_state.detach().to(dtype or initial_state.dtype).requires_grad_(grads)
    o, s = fn(*leaves, initial_state=h0, output_final_state=True, **options)
    out = {"o": o.detach(), "state": s.detach()}
    if not grads:
        return out
    gen = torch.Generator().manual_seed(1234)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s)).sum()
    inputs = leaves + ([h0] if h0 is not None else [])
    names = [f"grad{i}" for i in range(len(leaves))] + (["grad_state"] if h0 is not None else [])
    out.update(zip(names, torch.autograd.grad(loss, inputs)))
    return out


def rel_max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max(max |b|, 1)``: the error against the reference's scale, or against the inputs' scale
    (the tests draw O(1) inputs) when the reference is tiny: the gradient of a gate that decays to exp(-40) is
    itself ~1e-18, the sum of O(1) terms that cancel, and no form can give it to 1e-10 relative."""
    if a.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def assert_results_close(result: dict, reference: dict, *, tol: float, what: str = "") -> None:
    assert result.keys() == reference.keys()
    for key, ref in reference.items():
        got = result[key]
        assert got.shape == ref.shape, f"{what} {key}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        assert torch.isfinite(got).all(), f"{what} {key}: non-finite values"
        err = rel_max_err(got, ref)
        assert err <= tol, f"{what} {key}: relative error {err:.3g} > {tol:g}"


def check_forms(fn, args, *, initial_state=None, modes=("chunk", "parallel", "recurrent"), dtype=torch.float64,
                tol=1e-10, **options):
    """Every form in ``modes`` (run in ``dtype``) against the float64 token loop: output, final state, and the
    gradient of every input."""
    reference = run_form(fn, args, initial_state=initial_state, dtype=torch.float64, mode="recurrent", **options)
    for mode in modes:
        result = run_form(fn, args, initial_state=initial_state, dtype=dtype, mode=mode, **options)
        assert_results_close(result, reference, tol=tol, what=f"{mode}/{dtype}")
        # without gradients the streaming chunk forms take their in-place inference path: same numbers
        with torch.no_grad():
            result = run_form(fn, args, initial_state=initial_state, dtype=dtype, mode=mode, grads=False, **options)
        assert_results_close(result, {key: reference[key] for key in ("o", "state")}, tol=tol,
                             what=f"{mode}/{dtype}/no_grad")


def check_prefill_then_decode(fn, args, *, split: int, chunk_size: int, **options):
    """Chunked prefill of ``split`` tokens, then recurrent steps one token at a time == one pass (float64)."""
    full_o, full_s = fn(*args, output_final_state=True, mode="recurrent", **options)
    o, s = fn(*(a[:, :split] for a in args), output_final_state=True, mode="chunk", chunk_size=chunk_size, **options)
    outs = [o]
    for t in range(split, args[0].shape[1]):
        o, s = fn(*(a[:, t:t + 1] for a in args), initial_state=s, output_final_state=True, mode="recurrent",
                  **options)
        outs.append(o)
    assert rel_max_err(torch.cat(outs, 1), full_o) <= 1e-12
    assert rel_max_err(s, full_s) <= 1e-12


def check_varlen(fn, args, cu_seqlens, *, initial_state, **options):
    """Packed sequences (B = 1) == one call per sequence, each from its own initial state, for every form."""
    for mode in ("chunk", "parallel", "recurrent"):
        o, s = fn(*args, cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=True, mode=mode,
                  **options)
        for i, (start, stop) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            o_i, s_i = fn(*(a[:, start:stop] for a in args), initial_state=initial_state[i:i + 1],
                          output_final_state=True, mode="recurrent", **options)
            if stop > start:
                assert rel_max_err(o[:, start:stop], o_i) <= 1e-12, (mode, i)
            assert rel_max_err(s[i:i + 1], s_i) <= 1e-12, (mode, i)


def check_attention_matrix(fn, args, **options):
    """Parallel mode's returned ``A [B, Hv, T, T]`` is causal and reproduces the output: ``o = A v``."""
    o, _, attention = fn(*args, mode="parallel", return_attention=True, **options)
    v = args[2]
    assert attention.shape == (v.shape[0], v.shape[2], v.shape[1], v.shape[1])
    assert attention.triu(1).abs().max() == 0
    torch.testing.assert_close(o, (attention @ v.transpose(1, 2)).transpose(1, 2), rtol=1e-12, atol=1e-12)
    return attention


def check_bfloat16(fn, args, initial_state=None, **options):
    """bf16 inputs run in float32 inside: the output is within its own bf16 rounding (2^-8 relative) of the
    float32 run on the same values, and the (float32) final state matches to 1e-5."""
    args16 = [a.to(torch.bfloat16) for a in args]
    h0 = None if initial_state is None else initial_state.float()
    o16, s16 = fn(*args16, initial_state=h0, output_final_state=True, **options)
    o32, s32 = fn(*(a.float() for a in args16), initial_state=h0, output_final_state=True, **options)
    assert o16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    assert ((o16.float() - o32).abs() <= 2 ** -8 * o32.abs() + 1e-6).all()
    torch.testing.assert_close(s16, s32, rtol=1e-5, atol=1e-5)


@pytest.fixture
def forms():
    """The helpers above, for the linear-family tests."""
    return SimpleNamespace(run=run_form, assert_close=assert_results_close, rel_err=rel_max_err, check=check_forms,
                           prefill_then_decode=check_prefill_then_decode, varlen=check_varlen,
                           attention_matrix=check_attention_matrix, bfloat16=check_bfloat16)


@pytest.fixture(params=["native", "torch"])
def kernel(request):
    """Run a test with the compiled CPU kernels (``ops/csrc``, where they build) and with the pure-PyTorch forms;
    a module opts in with ``pytestmark = pytest.mark.usefixtures("kernel")``."""
    from hybridattn.ops import _native

    if request.param == "torch":
        with _native.disabled():
            yield request.param
    else:
        yield request.param
