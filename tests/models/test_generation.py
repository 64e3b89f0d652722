"""generate(): greedy equals step-by-step argmax of full forwards, streaming, stop tokens, sampling filters,
left-padded batches."""

import pytest
import torch

from hybridattn.models.config import ModelConfig
from hybridattn.models.generation import _filter_logits, sample_next
from hybridattn.models.hybrid_lm import HybridLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=24, num_layers=4, hybrid="3:1",
                      linear=dict(num_heads=2, num_v_heads=4, head_dim=12, v_head_dim=8, chunk_size=8),
                      attention=dict(num_heads=2, head_dim=12), ffn=dict(intermediate_size=32))
    return HybridLM(cfg).eval()


@torch.no_grad()
def greedy_by_full_forwards(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_greedy_generation_matches_full_forwards_and_stream(model):
    ids = torch.randint(0, 40, (2, 11))
    out = model.generate(ids, 8)
    assert torch.equal(out, greedy_by_full_forwards(model, ids, 8))
    streamed = torch.stack(list(model.generate(ids, 8, stream=True)), 1)
    assert torch.equal(streamed, out[:, 11:])


def test_left_padded_batch_generates_as_each_prompt_alone(model):
    a, b = torch.randint(1, 40, (1, 9)), torch.randint(1, 40, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    attention_mask = torch.tensor([[1] * 9, [0] * 5 + [1] * 4])
    out = model.generate(batch, 6, attention_mask=attention_mask)
    assert torch.equal(out[0, 9:], model.generate(a, 6)[0, 9:])
    assert torch.equal(out[1, 9:], model.generate(b, 6)[0, 4:])


def test_stop_token_ends_rows_and_pads(model):
    ids = torch.randint(0, 40, (2, 5))
    free = model.generate(ids, 8)
    stop = int(free[0, 7])  # the third new token of row 0
    first = (free[0, 5:] == stop).nonzero()[0].item()
    out = model.generate(ids, 8, stop=stop)
    assert torch.equal(out[0, 5:5 + first + 1], free[0, 5:5 + first + 1])
    assert (out[0, 5 + first + 1:] == model.config.pad_token_id).all()
    if stop not in free[1, 5:].tolist():
        assert out.shape[1] == 13 and torch.equal(out[1], free[1])


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    ids = torch.randint(0, 40, (2, 6))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(ids, 7, temperature=1.3, top_p=0.8, generator=g1)
    s2 = model.generate(ids, 7, temperature=1.3, top_p=0.8, generator=g2)
    assert torch.equal(s1, s2)
    assert torch.equal(model.generate(ids, 7, temperature=2.0, top_k=1), model.generate(ids, 7))


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = torch.isfinite(_filter_logits(logits, None, 0.8))
    assert kept.tolist() == [[True, True, True, False, False]]  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
    assert torch.isfinite(_filter_logits(logits, 2, None)).tolist() == [[True, True, False, False, False]]
    counts = torch.bincount(torch.stack([sample_next(logits, temperature=1.0, top_k=2,
                                                     generator=torch.Generator().manual_seed(i))
                                         for i in range(400)]).flatten(), minlength=5)
    assert counts[2:].sum() == 0 and 0.6 < counts[0] / 400 < 0.82  # renormalised: 0.5 / 0.7 = 0.714


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(stop=[99]), "stop"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), "attention_mask: expected left padding"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_options(model, kwargs, match, stream):
    with pytest.raises(ValueError, match=match):  # raised by the call itself, also when streaming
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, stream=stream, **kwargs)
