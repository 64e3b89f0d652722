"""Auxiliary losses reach training: the DSA indexer learns from its KL loss (also under DDP, which fails on a
parameter without gradient), and the MoE load-balancing loss adds its weighted gradient to the router's."""

import pytest
import torch
import torch.distributed as dist

from hybridattn.models import HybridLM, ModelConfig
from hybridattn.tasks import MQAR
from hybridattn.train import TrainConfig, Trainer
from hybridattn.train.trainer import batch_seed

TASK = MQAR(vocab_size=32, seq_len=24, num_kv_pairs=3)
INDEXER = ("index_q_proj", "index_k_proj", "index_w_proj")


def dsa_model():
    torch.manual_seed(0)
    return HybridLM(ModelConfig(vocab_size=32, d_model=32, num_layers=2, layers=["dsa", "gated_deltanet"],
                                attention=dict(num_heads=4), linear=dict(num_heads=2), ffn=dict(intermediate_size=48),
                                mixer_options={"dsa": {"top_k": 4, "index_heads": 2, "index_dim": 8}}))


def train_config(**kw):
    return TrainConfig(**{"steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "progress": False,
                          "eval_examples": 4, **kw})


def indexer_weights(model):
    return {n: p for n, p in model.named_parameters() if any(part in n for part in INDEXER)}


def test_one_training_step_gives_the_indexer_gradients_and_moves_it():
    model = dsa_model()
    before = {n: p.detach().clone() for n, p in indexer_weights(model).items()}
    record = Trainer(model, TASK, train_config()).train_step()
    assert len(before) == 3 and record["aux_loss"] > 0
    for name, p in indexer_weights(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p.detach(), before[name]), name


def test_ddp_world_size_one_trains_two_steps(tmp_path):
    # DDP without find_unused_parameters (as train/distributed.py wraps) fails at step 2 when a parameter got no
    # gradient at step 1; world_size 1 is not wrapped by the trainer, so the test wraps it as a multi-process run is
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = dsa_model()
        trainer = Trainer(model, TASK, train_config())
        trainer.ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        records = [trainer.train_step() for _ in range(2)]
    finally:
        dist.destroy_process_group()
    assert [r["step"] for r in records] == [1, 2] and all(r["aux_loss"] > 0 for r in records)


def moe_model(coef):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=32, num_layers=2, hybrid="1:1", attention=dict(num_heads=4),
                      linear=dict(num_heads=2), moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                         router_aux_loss_coef=coef))
    return HybridLM(cfg)


def load_balancing_by_hand(router_logits, top_k):
    """Switch loss pooled over layers (transformers' load_balancing_loss_func): E * sum_e f_e P_e with f_e the
    share of top-k slots given to expert e and P_e its mean probability, over every layer's tokens."""
    logits = torch.cat(router_logits)  # (L * N, E)
    probs = torch.softmax(logits.double(), -1)
    chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, -1).indices, 1.0)
    return probs.shape[-1] * (chosen.mean(0) * probs.mean(0)).sum()


@pytest.mark.parametrize("coef", [0.5, 2.0])
def test_moe_aux_loss_adds_its_weighted_gradient_to_the_router(coef):
    grads = {}
    for c in (0.0, coef):
        model = moe_model(c)
        Trainer(model, TASK, train_config(grad_clip=0.0)).train_step()
        grads[c] = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("mlp.router.weight")}
    # the same forward again, its router logits captured, the loss computed here
    model = moe_model(0.0)
    routers = [m.router for m in model.modules() if hasattr(m, "router")]
    captured = []
    hooks = [r.register_forward_hook(lambda mod, inp, out: captured.append(out)) for r in routers]
    model(TASK.sample(4, seed=batch_seed(0, 0)).inputs)
    for h in hooks:
        h.remove()
    weights = [r.weight for r in routers]
    expected = torch.autograd.grad(load_balancing_by_hand(captured, 2), weights)
    assert len(grads[coef]) == 2
    for (name, g), g0, want in zip(grads[coef].items(), grads[0.0].values(), expected):
        assert (g - g0).abs().max() > 0, name
        torch.testing.assert_close(g - g0, coef * want, rtol=1e-4, atol=1e-7)
