"""DSA mixer: the indexer's KL loss against a dense float64 reference and against a constructed zero case, which
parameters it trains, the attention options taken from the config (checked against MultiHeadAttention), and a
cache that holds every tensor once."""

import pytest
import torch

from hybridattn.layers.dsa_attention import DSAAttention, DSACache
from hybridattn.layers.registry import build_mixer
from hybridattn.models import ModelConfig
from hybridattn.ops.dsa_attention import dsa_attention, indexer_kl_loss, indexer_kl_loss_reference
from hybridattn.ops.positions import apply_rotary

INDEXER = ("index_q_proj.weight", "index_k_proj.weight", "index_w_proj.weight")


def _layer(top_k=5, **kw):
    torch.manual_seed(0)
    layer = DSAAttention(32, 4, n_kv_heads=2, top_k=top_k, index_heads=2, index_dim=8, **kw).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)  # large enough that attention and indexer are far from uniform
    return layer


def _reference_inputs(layer, x):
    """q, k (RoPE'd) and the indexer tensors recomputed from the layer's weights, outside the layer."""
    b, t, _ = x.shape
    pos = torch.arange(t)
    q = apply_rotary(layer.q_proj(x).view(b, t, 4, 8), pos)
    k = apply_rotary(layer.k_proj(x).view(b, t, 2, 8), pos)
    iq = layer.index_q_proj(x).view(b, t, 2, 8)
    w = layer.index_w_proj(x) / (2 * 8) ** 0.5
    return q, k, iq, layer.index_k_proj(x), w


@pytest.mark.parametrize("t,top_k", [(13, 5), (9, 20), (17, 1)])
def test_indexer_kl_matches_dense_float64_reference(t, top_k):
    layer = _layer(top_k)
    x = torch.randn(2, t, 32, dtype=torch.float64)
    layer(x)
    q, k, iq, ik, w = _reference_inputs(layer, x)
    ref = indexer_kl_loss_reference(q, k, iq, ik, top_k=top_k, index_weights=w)
    torch.testing.assert_close(layer.aux_loss, ref, rtol=1e-12, atol=1e-14)
    assert ref > 0 or top_k == 1  # one selected key: both distributions are a point mass


def test_kl_is_zero_when_the_indexer_equals_the_target_and_positive_otherwise():
    torch.manual_seed(1)
    b, t, h, hi, di = 2, 11, 3, 2, 6
    iq, ik = torch.randn(b, t, hi, di, dtype=torch.float64), torch.randn(b, t, di, dtype=torch.float64)
    w = torch.rand(b, t, hi, dtype=torch.float64)
    q, k, v = (torch.randn(b, t, h, 4, dtype=torch.float64) for _ in range(3))
    _, (idx, ok), _ = dsa_attention(q, k, v, iq, ik, top_k=4, index_weights=w, return_indices=True,
                                    return_weights=True)
    # attention weights built as the indexer's own softmax over the selected keys, the same in every head
    s = torch.relu(torch.einsum("bthd,btkd->bthk", iq, ik[torch.arange(b)[:, None, None], idx]))
    logits = torch.einsum("bthk,bth->btk", s, w).masked_fill(~ok, float("-inf"))
    probs = torch.softmax(logits, -1)[:, :, None].expand(b, t, h, 4)
    assert indexer_kl_loss(iq, ik, w, idx, ok, probs).abs() < 1e-14
    # a different target: the KL computed here, slot by slot
    other = torch.softmax(2 * logits, -1)
    kl = torch.where(ok, other * (other.log() - torch.log_softmax(logits, -1)), 0.0).sum(-1).mean()
    got = indexer_kl_loss(iq, ik, w, idx, ok, other[:, :, None].expand(b, t, h, 4))
    torch.testing.assert_close(got, kl, rtol=1e-12, atol=1e-14)
    assert got > 1e-3


def test_uniform_attention_and_uniform_indexer_give_zero_kl():
    layer = _layer(4)
    with torch.no_grad():
        layer.q_proj.weight.zero_()       # equal logits: uniform over each query's selected keys
        layer.index_q_proj.weight.zero_()  # indexer scores all 0: uniform over the same keys
    layer(torch.randn(2, 12, 32, dtype=torch.float64))
    assert layer.aux_loss.abs() < 1e-15


def test_aux_loss_trains_the_indexer_only_and_the_output_loss_never_reaches_it():
    layer = _layer()
    x = torch.randn(2, 13, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    layer.aux_loss.backward(retain_graph=True)
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in INDEXER)
    assert all(g is None for n, g in grads.items() if n not in INDEXER) and x.grad is None
    layer.zero_grad(set_to_none=True)
    y.square().sum().backward()
    assert all(p.grad is None for n, p in layer.named_parameters() if n in INDEXER)


def test_no_aux_loss_without_gradients_or_with_a_cache():
    layer = _layer()
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
    assert layer.aux_loss is None
    layer(x, cache=layer.new_cache(1))
    assert layer.aux_loss is None


def test_padded_queries_are_left_out_of_the_mean():
    layer = _layer()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    layer(x)
    alone = layer.aux_loss
    padded = torch.cat([torch.randn(1, 3, 32, dtype=torch.float64), x], 1)
    layer(padded, token_mask=torch.tensor([[False] * 3 + [True] * 10]))
    torch.testing.assert_close(layer.aux_loss, alone, rtol=1e-12, atol=1e-14)


def test_returned_weights_are_the_dense_attention_over_the_selected_keys():
    layer = _layer(4)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    q, k, iq, ik, w = _reference_inputs(layer, x)
    v = torch.randn_like(k)
    o, (idx, ok), probs = dsa_attention(q, k, v, iq, ik, top_k=4, index_weights=w, return_indices=True,
                                        return_weights=True)
    dense = torch.zeros(2, 9, 4, 9, dtype=torch.float64)  # (B, Tq, H, Tk)
    dense.scatter_add_(-1, idx[:, :, None].expand(-1, -1, 4, -1), probs * ok[:, :, None])
    keep = dense.sum(2) > 0
    logits = torch.einsum("bthd,bshd->bths", q, k.repeat_interleave(2, 2)) / 8 ** 0.5
    ref = torch.softmax(logits.masked_fill(~keep[:, :, None], float("-inf")), -1)
    torch.testing.assert_close(dense, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(o, torch.einsum("bths,bshd->bthd", ref, v.repeat_interleave(2, 2)))
    # the fla-style call without the new flags is unchanged
    torch.testing.assert_close(dsa_attention(q, k, v, iq, ik, top_k=4, index_weights=w), o, rtol=0, atol=0)


def _config(**attention):
    return ModelConfig(d_model=32, num_layers=1, layers=["dsa"], mixer_options={"dsa": {"top_k": 64}},
                       attention=dict(num_heads=4, num_kv_heads=2, **attention))


@pytest.mark.parametrize("attention", [
    dict(qk_norm=True, output_gate=True),
    dict(partial_rotary_factor=0.5, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    dict(position="none", head_dim=12),
], ids=["qk_norm-gate", "partial-scaled-rope", "nope-head_dim"])
def test_attention_options_follow_multihead_attention(attention):
    # with top_k >= T, DSA is full causal attention, so the attention mixer with the same weights is a reference
    cfg = _config(**attention)
    torch.manual_seed(2)
    dsa = build_mixer("dsa", cfg, 0).double()
    ref = build_mixer("attention", cfg, 0).double()
    missing, unexpected = ref.load_state_dict(dsa.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == sorted(INDEXER)
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    torch.testing.assert_close(dsa(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("position", ["alibi", "t5"])
def test_score_bias_positions_are_refused(position):
    with pytest.raises(ValueError, match=r"attention\.position: mixer 'dsa'.*" + position):
        build_mixer("dsa", _config(position=position), 0)
    with pytest.raises(ValueError, match="positions"):
        DSAAttention(32, 4, positions=position)
    with pytest.raises(TypeError, match="window"):
        DSAAttention(32, 4, window=4)


@torch.no_grad()
def test_cache_holds_each_tensor_once_and_matches_the_full_forward():
    layer = _layer(6).eval()
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache(2)
    steps = [layer(x[:, :66], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(66, 70)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    assert isinstance(cache, DSACache) and cache.kv.capacity == 128  # doubled from 64 for the 66-token prefill
    torch.testing.assert_close(cache.index_k[:, :70], layer.index_k_proj(x), rtol=1e-13, atol=1e-14)
    # K and V (2 x Hkv x D) and one indexer key (Di) per slot, a validity byte per slot, a counter per row
    assert cache.nbytes() == 2 * 128 * (2 * 2 * 8 + 8) * 8 + 2 * 128 + 2 * 8
    with pytest.raises(ValueError, match="index_k"):
        cache.update(x.new_zeros(2, 1, 2, 8), x.new_zeros(2, 1, 2, 8), x.new_zeros(2, 1, 5), None)


def test_minimising_aux_loss_fits_the_indexer_to_the_attention():
    torch.manual_seed(0)
    layer = DSAAttention(32, 4, top_k=8, index_heads=4, index_dim=16)
    with torch.no_grad():
        layer.q_proj.weight.normal_(std=0.3)  # a peaked main attention for the indexer to follow
        layer.k_proj.weight.normal_(std=0.3)
    opt = torch.optim.SGD([p for n, p in layer.named_parameters() if n.startswith("index_")], lr=1.0, momentum=0.9)
    x = torch.randn(2, 32, 32)
    losses = []
    for _ in range(30):
        layer(x)
        loss = layer.aux_loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]  # measured: 0.378 -> 0.064
