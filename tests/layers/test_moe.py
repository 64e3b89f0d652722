import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hybridattn.layers.moe import MoEFeedForward, load_balancing_loss, naive_moe

CASES = [  # (B, T, d, E, k, I, shared, norm)
    (2, 7, 12, 5, 2, 10, 6, True),
    (1, 13, 20, 8, 3, 6, 0, False),
    (3, 5, 9, 4, 1, 7, 5, False),
    (2, 3, 6, 3, 3, 5, 4, True),  # k == E
    (1, 1, 10, 6, 3, 8, 5, True),  # one token: the decoding path
]


def _ids(case):
    b, t, d, e, k, i, s, n = case
    return f"B{b}-T{t}-d{d}-E{e}-k{k}-I{i}-shared{s}-norm{int(n)}"


def _layer(d, e, k, i, shared, norm):
    layer = MoEFeedForward(d, num_experts=e, top_k=k, expert_hidden=i, shared_expert_hidden=shared,
                           norm_topk_prob=norm)
    # Large router weights spread the probabilities so top-k ties cannot flip between dtypes.
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    for p in layer.parameters():
        if p is not layer.router.weight:
            torch.nn.init.normal_(p, std=0.3)
    return layer


def _grads(layer, x, out, cot):
    return torch.autograd.grad((out * cot).sum(), [x, *layer.parameters()])


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fast_matches_float64_reference_outputs_and_grads(case):
    b, t, d, e, k, i, shared, norm = case
    layer = _layer(d, e, k, i, shared, norm)
    ref_layer = copy.deepcopy(layer).double()
    x = torch.randn(b, t, d, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out = layer(x)
    ref = naive_moe(ref_layer, x64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    cot = torch.randn_like(ref)
    for got, want in zip(_grads(layer, x, out, cot.float()), _grads(ref_layer, x64, ref, cot)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES[:2], ids=_ids)
def test_fast_float64_is_exact_to_rounding(case):
    b, t, d, e, k, i, shared, norm = case
    layer = _layer(d, e, k, i, shared, norm).double()
    x = torch.randn(b, t, d, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_inference_matches_float64_reference(case, dtype, tol):
    """Without autograd, up to 8 tokens take the compiled path (``ops/csrc/moe_decode.cpp``), more tokens the
    grouped GEMMs: both against the token-by-token float64 reference, router logits included."""
    from hybridattn.ops import _native

    b, t, d, e, k, i, shared, norm = case
    layer = _layer(d, e, k, i, shared, norm).to(dtype)
    x = torch.randn(b, t, d, dtype=dtype)
    with torch.no_grad():
        if b * t <= 8 and _native.native_ops("moe_decode") is not None:
            assert layer._can_run_natively(x.reshape(-1, d))
        out, logits = layer(x), layer.router_logits
        ref_layer = copy.deepcopy(layer).double()
        ref = naive_moe(ref_layer, x.double())
        ref_logits = x.double().reshape(-1, d) @ ref_layer.router.weight.T
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(logits.double(), ref_logits, rtol=tol, atol=tol)


@given(b=st.integers(1, 3), t=st.integers(1, 9), e=st.integers(1, 6), data=st.data())
def test_property_random_shapes(b, t, e, data):
    k = data.draw(st.integers(1, e))
    layer = _layer(5, e, k, 3, data.draw(st.sampled_from([0, 4])), data.draw(st.booleans())).double()
    x = torch.randn(b, t, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-12, atol=1e-12)


def test_each_expert_sees_only_its_tokens(monkeypatch):
    # The grouped path runs N * k expert rows in total, not N * E: count rows through the expert weights.
    layer = _layer(8, 6, 2, 4, 0, True)
    x = torch.randn(2, 9, 8)
    rows = []
    original = torch.nn.functional.linear

    def counting_linear(inp, weight, bias=None):
        if weight.shape == (8, 8) or weight.shape == (8, 4):  # gate_up [2I, d] or down [d, I] slices
            rows.append(inp.shape[0])
        return original(inp, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    layer(x)
    assert sum(rows) == 2 * (2 * 9 * 2)  # gate_up and down, each over N * k rows


def _naive_aux(logits_list, k, mask):
    e = logits_list[0].shape[1]
    f = torch.zeros(e, dtype=torch.float64)
    p = torch.zeros(e, dtype=torch.float64)
    rows = 0.0
    for logits in logits_list:
        for row, keep in zip(logits.double(), mask):
            if not keep:
                continue
            probs = torch.softmax(row, -1)
            for j in probs.topk(k).indices.tolist():
                f[j] += 1
            p += probs
            rows += 1
    return e * ((f / rows) * (p / rows)).sum()


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_naive(masked):
    logits = [torch.randn(11, 5) for _ in range(3)]
    mask = torch.rand(11) > 0.3 if masked else torch.ones(11, dtype=torch.bool)
    got = load_balancing_loss(logits, 2, token_mask=mask if masked else None)
    torch.testing.assert_close(got.double(), _naive_aux(logits, 2, mask), rtol=1e-6, atol=1e-7)


def test_aux_loss_attribute_and_gradient():
    layer = _layer(6, 4, 2, 5, 0, True)
    x = torch.randn(2, 5, 6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False
    layer(x, token_mask=mask)
    want = _naive_aux([layer.router_logits.detach()], 2, mask.reshape(-1))
    torch.testing.assert_close(layer.aux_loss.double(), want, rtol=1e-6, atol=1e-7)
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_sparse_layer_rule_in_a_model():
    # Qwen2-MoE / Qwen3-Next: layer i is sparse when (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers
    from hybridattn.models import HybridLM, ModelConfig

    cfg = ModelConfig(vocab_size=16, d_model=16, num_layers=6, layers=["attention"] * 6, attention=dict(num_heads=2),
                      moe=dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=8,
                               decoder_sparse_step=2, mlp_only_layers=[3]))
    model = HybridLM(cfg)
    got = [isinstance(layer.mlp, MoEFeedForward) for layer in model.layers]
    assert got == [False, True, False, False, False, True]


def test_validation_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(4, num_experts=2, top_k=3, expert_hidden=4)
    with pytest.raises(ValueError, match="activation"):
        MoEFeedForward(4, num_experts=2, top_k=1, expert_hidden=4, activation="relu6")
    layer = MoEFeedForward(4, num_experts=2, top_k=1, expert_hidden=4)
    with pytest.raises(ValueError, match="x: expected last dimension d_model=4"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 3, 4), token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="router_logits"):
        load_balancing_loss([], 1)


@pytest.mark.needs_transformers
@pytest.mark.parametrize("shared,norm", [(6, True), (6, False)])
def test_matches_transformers_qwen3_next_sparse_moe_block(shared, norm):
    pytest.importorskip("transformers", reason="transformers is the peer this test compares against")
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    cfg = Qwen3NextConfig(hidden_size=12, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=10,
                          shared_expert_intermediate_size=shared, norm_topk_prob=norm)
    peer = Qwen3NextSparseMoeBlock(cfg)
    for p in peer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer = MoEFeedForward(12, num_experts=6, top_k=2, expert_hidden=10, shared_expert_hidden=shared,
                           norm_topk_prob=norm)
    with torch.no_grad():
        layer.router.weight.copy_(peer.gate.weight)
        layer.gate_up_proj.copy_(peer.experts.gate_up_proj)
        layer.down_proj.copy_(peer.experts.down_proj)
        layer.shared_expert.load_state_dict(peer.shared_expert.state_dict())
        layer.shared_expert_gate.weight.copy_(peer.shared_expert_gate.weight)
    x = torch.randn(3, 7, 12)
    torch.testing.assert_close(layer(x), peer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.needs_transformers
def test_load_balancing_loss_matches_transformers():
    pytest.importorskip("transformers", reason="transformers is the peer this test compares against")
    from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func

    logits = tuple(torch.randn(2 * 6, 7) for _ in range(3))
    mask = torch.rand(2, 6) > 0.3
    torch.testing.assert_close(load_balancing_loss(logits, 3, token_mask=mask),
                               load_balancing_loss_func(logits, 7, 3, mask.long()))
    torch.testing.assert_close(load_balancing_loss(logits, 3), load_balancing_loss_func(logits, 7, 3))
