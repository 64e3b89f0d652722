"""Qwen3-Next on the CPU: hybridattn vs transformers' PyTorch path, same weights, one run.

    python -m hybridattn.bench.qwen3_next [--seq-len 2048] [--repeats 3] [--decode-tokens 16]

Builds a random transformers ``Qwen3NextForCausalLM`` (hidden 512, 8 layers in Qwen3-Next's 3:1 layout, GVA,
MoE with a shared expert), saves it in the transformers format, loads it into a ``HybridLM`` and times, in fp32:

- prefill: one forward over a ``T``-token prompt that fills the cache and returns the last position's logits;
- decode: per-token latency of greedy steps continuing that cache.

The peer runs without fla / causal-conv1d: transformers chooses those kernels when it imports its modeling file
(``use_kernel_func_from_hub_with_fallback`` imports the package and wraps the found function), and fla cannot run
on a CPU anyway. :func:`transformers_without_fla` rebinds the module-level kernel names to the PyTorch functions
the wrappers keep as ``__wrapped__``; the layers look these names up on every call, so the peer runs exactly its
torch fallback. The benchmark checks that the rebinding took effect before timing.

Targets (ratios of medians in the same run): prefill >= 3x faster, decode >= 1.5x faster per token.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

TORCH_FALLBACKS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                   "causal_conv1d_update")


def transformers_without_fla(setattr_fn=setattr):
    """Import transformers' Qwen3-Next modeling module with its kernels pointed at the PyTorch reference paths.

    Args:
        setattr_fn: how to rebind (``setattr``, or pytest's ``monkeypatch.setattr`` to undo it after a test).

    Returns:
        The ``transformers.models.qwen3_next.modeling_qwen3_next`` module.

    Raises:
        RuntimeError: a kernel name is still bound to something other than the module's own torch function.
    """
    import transformers.models.qwen3_next.modeling_qwen3_next as module

    for name in TORCH_FALLBACKS:
        fn = getattr(module, name)
        setattr_fn(module, name, getattr(fn, "__wrapped__", fn))
        bound = getattr(module, name)
        if bound.__module__ != module.__name__ or hasattr(bound, "__wrapped__"):
            raise RuntimeError(f"{name}: could not restore transformers' torch path (bound to {bound!r})")
    return module


def bench_config(**overrides) -> dict:
    """The benchmark's Qwen3-Next shape: the 80B model's proportions scaled to hidden 512 (head dims 128 / 64,
    twice as many value heads as key heads, 32 experts of which 4 + 1 shared are active)."""
    cfg = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=2, head_dim=64,
               linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
               num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
               shared_expert_intermediate_size=256, initializer_range=0.05)
    cfg.update(overrides)
    return cfg


def _interleaved_decode(peer, past, ours, cache, peer_token, our_token, steps, times):
    # Alternate one peer step and one hybridattn step so that both see the same machine load and context length.
    import time

    for _ in range(steps):
        t0 = time.perf_counter()
        out = peer(peer_token, past_key_values=past, use_cache=True)
        t1 = time.perf_counter()
        logits, cache = ours(our_token, cache=cache)
        t2 = time.perf_counter()
        past, peer_token, our_token = out.past_key_values, out.logits[:, -1:].argmax(-1), logits[:, -1:].argmax(-1)
        times["peer_decode"].append(t1 - t0)
        times["ours_decode"].append(t2 - t1)


def run(*, seq_len: int = 2048, repeats: int = 3, decode_tokens: int = 16, threads: int | None = 1,
        console=None) -> tuple[bool, list]:
    """Time both models; returns (every target passed, table rows)."""
    import time

    from hybridattn.bench.measure import TargetRow, print_table, print_targets
    from hybridattn.models import HybridLM

    if threads is not None:
        torch.set_num_threads(threads)
    module = transformers_without_fla()
    from transformers import Qwen3NextConfig

    torch.manual_seed(0)
    peer = module.Qwen3NextForCausalLM(Qwen3NextConfig(**bench_config())).eval()
    with tempfile.TemporaryDirectory() as tmp:
        peer.save_pretrained(tmp)
        ours = HybridLM.from_pretrained(tmp).eval()
    ids = torch.randint(0, peer.config.vocab_size, (1, seq_len))
    last = torch.tensor([-1])
    times = {key: [] for key in ("peer_prefill", "ours_prefill", "peer_decode", "ours_decode")}
    with torch.no_grad():
        for round_ in range(repeats + 1):  # round 0 is warm-up
            t0 = time.perf_counter()
            out = peer(ids, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            logits, cache = ours(ids, cache=ours.new_cache(1), logits_at=last)
            t2 = time.perf_counter()
            if round_:
                times["peer_prefill"].append(t1 - t0)
                times["ours_prefill"].append(t2 - t1)
            _interleaved_decode(peer, out.past_key_values, ours, cache, out.logits.argmax(-1), logits.argmax(-1),
                                decode_tokens if round_ else 2, times if round_ else {k: [] for k in times})
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = ((logits[:, -1] - out.logits[:, -1]).abs().max() / out.logits[:, -1].abs().max()).item()
    cfg = bench_config()
    print_table(
        f"Qwen3-Next (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers 3:1, {cfg['num_experts']} experts "
        f"top-{cfg['num_experts_per_tok']} + shared), CPU fp32, {torch.get_num_threads()} thread(s), "
        f"T={seq_len}, medians of {repeats} prefills and {repeats * decode_tokens} decode steps; "
        f"last-logit rel. diff {diff:.1e}",
        ("", "transformers (torch path, no fla)", "hybridattn", "speed-up"),
        [("prefill (s)", f"{med['peer_prefill']:.3f}", f"{med['ours_prefill']:.3f}",
          f"{med['peer_prefill'] / med['ours_prefill']:.2f}x"),
         ("decode (ms/token)", f"{1e3 * med['peer_decode']:.2f}", f"{1e3 * med['ours_decode']:.2f}",
          f"{med['peer_decode'] / med['ours_decode']:.2f}x")],
        console=console)
    rows = [TargetRow("prefill speed-up vs transformers", ">= 3x", f"{med['peer_prefill'] / med['ours_prefill']:.2f}x",
                      med["peer_prefill"] / med["ours_prefill"], 3.0),
            TargetRow("decode speed-up per token vs transformers", ">= 1.5x",
                      f"{med['peer_decode'] / med['ours_decode']:.2f}x", med["peer_decode"] / med["ours_decode"], 1.5)]
    return print_targets("Qwen3-Next targets", rows, console=console), rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both models (0 = torch default)")
    args = parser.parse_args(argv)
    passed, _ = run(seq_len=args.seq_len, repeats=args.repeats, decode_tokens=args.decode_tokens,
                    threads=args.threads or None)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
