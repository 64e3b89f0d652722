"""Linformer attention: float64 reference, identity projections == full attention, causal rejected."""

import pytest
import torch

from hybridattn.ops.linformer import linformer_attention, linformer_reference
from hybridattn.ops.softmax_attention import softmax_attention


@pytest.mark.parametrize("per_head", [False, True], ids=["shared-E", "per-head-E"])
def test_matches_reference_with_gradients(per_head):
    gen = torch.Generator().manual_seed(0)
    b, t, h, hkv, d, dv, kp = 2, 41, 6, 3, 10, 7, 9
    shape = (hkv, kp, t) if per_head else (kp, t)
    tensors = [torch.randn(*s, generator=gen) / (t ** 0.5 if len(s) < 4 else 1)
               for s in [(b, t, h, d), (b, t, hkv, d), (b, t, hkv, dv), shape, shape]]
    leaves32 = [x.clone().requires_grad_() for x in tensors]
    leaves64 = [x.double().requires_grad_() for x in tensors]
    out = linformer_attention(*leaves32)
    ref = linformer_reference(*leaves64)
    grad = torch.randn(out.shape, generator=gen)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, w in zip(torch.autograd.grad(out, leaves32, grad), torch.autograd.grad(ref, leaves64, grad.double())):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5)


def test_identity_projections_equal_full_attention():
    q, k, v = torch.randn(2, 23, 4, 8), torch.randn(2, 23, 2, 8), torch.randn(2, 23, 2, 8)
    eye = torch.eye(23)
    torch.testing.assert_close(linformer_attention(q, k, v, eye, eye),
                               softmax_attention(q, k, v, backend="naive"), rtol=1e-5, atol=1e-6)


def test_causal_and_shape_errors():
    q = torch.randn(1, 8, 2, 4)
    e = torch.randn(3, 8)
    with pytest.raises(ValueError, match="causal"):
        linformer_attention(q, q, q, e, e, causal=True)
    with pytest.raises(ValueError, match="E: expected"):
        linformer_attention(q, q, q, torch.randn(3, 7), e)
    with pytest.raises(ValueError, match="F: expected the projected length"):
        linformer_attention(q, q, q, e, torch.randn(4, 8))


@pytest.mark.parametrize("scale, err, match", [("x", TypeError, "scale: expected a float, received str"),
                                               (float("nan"), ValueError, "scale: expected a finite float"),
                                               (True, TypeError, "scale: expected a float, received bool")])
def test_scale_is_validated(scale, err, match):
    q, e = torch.randn(1, 6, 2, 4), torch.eye(6)
    with pytest.raises(err, match=match):
        linformer_attention(q, q, q, e, e, scale=scale)
