"""The benchmark's synthetic caches are the caches a real prefill leaves: the same tensors (sizes checked against
the memory planner) and the same decoding arithmetic (with a real prefill's contents copied in, the next step is
identical)."""

import torch

from hybridattn.bench.models import bench_config, fill_cache
from hybridattn.models.hybrid_lm import HybridLM
from hybridattn.models.memory import plan


def test_synthetic_cache_has_the_planned_size_and_decodes_like_a_real_one():
    cfg = bench_config("3:1", d_model=32, num_layers=4, vocab_size=64)
    model = HybridLM(cfg).eval()
    synthetic = fill_cache(model, 128, generator=torch.Generator().manual_seed(0))
    real = model.new_cache(1)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 128)), cache=real)
    assert synthetic.nbytes() == real.nbytes() == plan(cfg, 128, dtype=torch.float32).cache_bytes
    assert synthetic.seen_tokens == real.seen_tokens == 128
    for s, r in zip(synthetic.layers, real.layers):
        for t_s, t_r in zip(s.tensors(), r.tensors()):
            t_s.copy_(t_r)
    with torch.no_grad():
        a, _ = model(torch.tensor([[5]]), cache=synthetic)
        b, _ = model(torch.tensor([[5]]), cache=real)
    torch.testing.assert_close(a, b)  # the same arithmetic on caches at other addresses: fp32 tolerance
