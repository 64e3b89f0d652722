import pytest
import torch
import torch.nn.functional as F

from hybridattn.layers.norms import GatedRMSNorm, RMSNorm, rms_norm


def rms_reference(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("zero_centered", [False, True], ids=["plain", "zero_centered"])
def test_rmsnorm_matches_reference_outputs_and_grads(zero_centered):
    norm = RMSNorm(60, eps=1e-5, zero_centered=zero_centered).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 7, 60, dtype=torch.float64, requires_grad=True)
    w = norm.weight
    ref = rms_reference(x, 1e-5) * ((1 + w) if zero_centered else w)
    out = norm(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w), g)
    exp = torch.autograd.grad(ref, (x, w), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_zero_centered_starts_as_plain_rms_and_plain_starts_at_ones():
    x = torch.randn(4, 32)
    torch.testing.assert_close(RMSNorm(32, zero_centered=True)(x), rms_reference(x, 1e-6).float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(RMSNorm(32, zero_centered=True).weight, torch.zeros(32))
    assert torch.equal(RMSNorm(32).weight, torch.ones(32))
    torch.testing.assert_close(RMSNorm(32)(x), rms_reference(x, 1e-6).float(), rtol=1e-6, atol=1e-6)


def test_low_precision_is_normalised_in_fp32():
    # values whose squares overflow fp16: computing in fp16 would give inf / 0
    x = torch.full((2, 16), 300.0, dtype=torch.float16)
    x[:, ::2] = -300.0
    out = RMSNorm(16)(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, torch.sign(x.float()).half(), rtol=0, atol=1e-3)
    xb = torch.randn(5, 64, dtype=torch.bfloat16) * 50
    # fp32 reductions in another order may move a bf16 result by one ulp (2^-7 relative)
    torch.testing.assert_close(rms_norm(xb), rms_reference(xb.float(), 1e-6).to(torch.bfloat16), rtol=2**-7, atol=0)


def test_gated_rmsnorm_matches_reference():
    norm = GatedRMSNorm(20, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    o = torch.randn(2, 5, 3, 20, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 5, 3, 20, dtype=torch.float64, requires_grad=True)
    ref = rms_reference(o, 1e-6) * norm.weight * (z * torch.sigmoid(z))
    out = norm(o, z)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (o, z, norm.weight), g), torch.autograd.grad(ref, (o, z, norm.weight), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ob, zb = o.detach().to(torch.bfloat16), z.detach().to(torch.bfloat16)
    expected = (rms_reference(ob.float(), 1e-6) * norm.weight.detach() * F.silu(zb.double())).to(torch.bfloat16)
    torch.testing.assert_close(norm.float()(ob, zb), expected, rtol=2**-7, atol=0)  # one bf16 ulp, as above


def test_norm_validation():
    with pytest.raises(ValueError, match="x: expected last dimension 8"):
        RMSNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="z: expected shape"):
        GatedRMSNorm(8)(torch.randn(2, 8), torch.randn(3, 8))
    with pytest.raises(TypeError, match="x"):
        RMSNorm(8)(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="dim"):
        RMSNorm(0)
