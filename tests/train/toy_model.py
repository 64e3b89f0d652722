"""A tiny causal transformer used to test the training machinery independently of the library's models."""

import torch
from torch import nn


class ToyLM(nn.Module):
    """Embedding + one causal self-attention block + head: ``[B, T]`` ids -> ``[B, T, V]`` logits."""

    def __init__(self, vocab_size: int, d_model: int = 32, max_len: int = 128, heads: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        # no projection biases: the key bias has an exactly-zero gradient whose rounding noise Adam would amplify
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True, bias=False)
        self.mlp = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 2 * d_model), nn.GELU(),
                                 nn.Linear(2 * d_model, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).triu(1)
        x = x + self.attn(x, x, x, attn_mask=causal, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.head(self.norm(x))


def train_toy(out, *, steps=12, ckpt=None, checkpoint_every=0, sleep=0.0, dist=None):
    """Train ToyLM on a small MQAR task and write losses, accuracies and final parameters to ``out`` (JSON)."""
    import json
    import time
    from pathlib import Path

    from hybridattn.tasks import MQAR
    from hybridattn.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model = ToyLM(64, max_len=32)
    config = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=3, seed=5, eval_examples=16,
                         checkpoint_every=checkpoint_every, progress=False)
    trainer = Trainer(model, MQAR(vocab_size=64, seq_len=32, num_kv_pairs=4), config, checkpoint_dir=ckpt,
                      dist=dist, step_callback=lambda step, record: time.sleep(sleep))
    result = trainer.fit()
    if dist is None or dist.is_main:
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        Path(out).write_text(json.dumps({
            "losses": [r["loss"] for r in result.history], "accuracy": [r["accuracy"] for r in result.history],
            "params": params.tolist(), "resumed_from": result.resumed_from, "final": result.final,
        }))
