"""Benchmark: the gated delta rule on CPU (``python -m hybridattn.bench.linear``).

Targets, at B=1, T=4,096, H=8, Dk=Dv=128, fp32, each printed as a ratio measured in this run:

- chunk forward >= 2x faster than fla's ``naive_chunk_gated_delta_rule`` and >= 3x faster than transformers'
  ``torch_chunk_gated_delta_rule`` (Qwen3-Next's CPU fallback);
- forward + backward >= 3x faster than autograd through the transformers function;
- FLOP efficiency: counted FLOPs / time >= 50% of this run's fp32 matmul throughput (the count is printed);
- recurrent decoding: one step's time after 64K consumed tokens within 1.25x of that after 1K (flat);
- chunk-mode peak memory grows linearly in T: bytes per token at 64K within 1.25x of that at 4K.

Peers are optional (``pip install .[bench]``); a missing peer prints its row as skipped. ``--quick`` runs the same
code at small sizes as a smoke test (its ratios are not the targets).
"""

from __future__ import annotations

import argparse
import inspect
import warnings

import torch
import torch.nn.functional as F

from hybridattn.bench.measure import (
    TargetRow, format_bytes, interleaved_medians, peak_memory,
    print_table, print_targets,
)
from hybridattn.ops import gated_delta_rule

FLOP_FORMULA = "B*H*T*(2*C*(3*Dk + 2*Dv) + 6*Dk*Dv)"
OWN_FLOP_FORMULA = "B*H*T*(2*C*(2*Dk + 1.5*Dv) + 6*Dk*Dv)"
MATMUL_N = 1024  # side of the square fp32 matmul whose throughput is the efficiency reference


def chunk_flops(b: int, t: int, h: int, dk: int, dv: int, c: int) -> int:
    """Matmul FLOPs of the standard WY/UT chunk form (fla's and transformers' ``chunk_gated_delta_rule``) per
    ``FLOP_FORMULA``: per chunk and head ``K K^T``, ``Q K^T``, ``T^-1 [K_w | V_beta]`` and ``P @ new``
    (``2 C^2 (3 Dk + 2 Dv)``), and ``W S``, ``Q S``, ``Kd^T new`` (``6 C Dk Dv``); the ``C x C`` inverse
    (``~C^3 / 3``) is left out. A count of the work the algorithm must do, as model FLOPs are: hybridattn's form
    solves for ``new`` directly and performs ``B*H*T*(2*C*(2*Dk + 1.5*Dv) + 6*Dk*Dv)`` (0.86x of it at the
    benchmark's sizes); :data:`OWN_FLOP_FORMULA` is printed beside it."""
    return b * h * t * (2 * c * (3 * dk + 2 * dv) + 6 * dk * dv)


def _inputs(b, t, h, dk, dv, *, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen)
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen), dim=-1)
    v = torch.randn(b, t, h, dv, generator=gen)
    g = F.logsigmoid(torch.randn(b, t, h, generator=gen) + 2.0)
    beta = torch.sigmoid(torch.randn(b, t, h, generator=gen))
    return [x.requires_grad_(grad) for x in (q, k, v, g, beta)]


def _peers():
    """The peer implementations that import, by name: callables ``(q, k, v, g, beta) -> (o, state)``."""
    peers = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

            # The public name dispatches to fla's Triton kernel when fla is installed; unwrap to the torch code.
            peers["transformers"] = inspect.unwrap(qwen3_next.torch_chunk_gated_delta_rule)
        except ImportError:
            pass
        try:
            from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule

            peers["fla"] = naive_chunk_gated_delta_rule
        except ImportError:
            pass
    return peers


def _fwd_bwd(fn, inputs):
    def step():
        o, _ = fn(*inputs)
        o.sum().backward()
        for x in inputs:
            x.grad = None

    return step


def parse_args(argv, description: str):
    """The options and sizes shared by the linear-attention benchmarks (this one and ``linear_gla``); sets the
    thread count. Returns ``(args, (B, T, H, D), memory lengths, decode-after lengths)``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not the targets")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for every measurement, ours and the peers' (default: torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = (1, 256, 2, 32) if args.quick else (1, 4096, 8, 128)
    lengths = (256, 512, 1024) if args.quick else (4096, 16384, 65536)
    decode_after = (64, 1024) if args.quick else (1024, 65536)
    return args, sizes, lengths, decode_after


def main(argv=None) -> int:
    args, (b, t, h, d), lengths, decode_after = parse_args(argv, __doc__.split("\n")[0])
    c, reps = args.chunk_size, args.repeats
    peers = _peers()
    ours = lambda *x: gated_delta_rule(*x, chunk_size=c)  # noqa: E731
    print(f"gated_delta_rule at B={b} T={t} H={h} Dk=Dv={d} fp32, chunk_size={c}, "
          f"{torch.get_num_threads()} threads, medians of {reps}")

    rows, times = [], []
    # Ours, the peers and the matmul reference are timed one call each in turn, so that the machine's drift (its
    # speed moved by 30% within minutes here) falls on every entry of a ratio alike.
    inputs = _inputs(b, t, h, d, d)
    mat_a, mat_b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    fwd = {"ours": lambda: ours(*inputs), "matmul": lambda: mat_a @ mat_b}
    fwd.update({name: (lambda fn=fn: fn(*inputs)) for name, fn in peers.items()})
    with torch.no_grad():
        for fn in fwd.values():  # warm-up
            fn()
        med = interleaved_medians(fwd, rounds=reps, warmup=0)
    t_ours = med["ours"]
    times.append(("ours chunk forward", t_ours))
    for name, goal in (("fla", 2.0), ("transformers", 3.0)):
        if name not in peers:
            print(f"skipped: {name} forward (not installed)")
            continue
        times.append((f"{name} chunk forward", med[name]))
        rows.append(TargetRow(f"forward vs {name}", f">= {goal}x", f"{med[name]:.3f}s / {t_ours:.3f}s",
                              med[name] / t_ours, goal))

    grads = _inputs(b, t, h, d, d, grad=True)
    fwd_bwd = {"ours": _fwd_bwd(ours, grads)}
    if "transformers" in peers:
        fwd_bwd["transformers"] = _fwd_bwd(peers["transformers"], grads)
    else:
        print("skipped: transformers forward+backward (not installed)")
    for fn in fwd_bwd.values():
        fn()
    med_fb = interleaved_medians(fwd_bwd, rounds=reps, warmup=0)
    times.append(("ours forward+backward", med_fb["ours"]))
    if "transformers" in med_fb:
        times.append(("transformers forward+backward", med_fb["transformers"]))
        rows.append(TargetRow("fwd+bwd vs transformers", ">= 3x",
                              f"{med_fb['transformers']:.3f}s / {med_fb['ours']:.3f}s",
                              med_fb["transformers"] / med_fb["ours"], 3.0))

    peak = 2.0 * MATMUL_N**3 / med["matmul"]
    flops = chunk_flops(b, t, h, d, d, c)
    achieved = flops / t_ours
    own = b * h * t * (2 * c * (2 * d + 1.5 * d) + 6 * d * d)
    print(f"counted FLOPs (the standard chunk form's) = {FLOP_FORMULA} = {flops / 1e9:.2f} GFLOP "
          f"(hybridattn's form itself performs {OWN_FLOP_FORMULA} = {own / 1e9:.2f} GFLOP); "
          f"fp32 {MATMUL_N}x{MATMUL_N} matmul {peak / 1e9:.1f} GFLOP/s (interleaved with the forward), "
          f"ours {achieved / 1e9:.1f} GFLOP/s")
    rows.append(TargetRow("FLOP efficiency (chunk fwd)", ">= 50% of matmul",
                          f"{achieved / 1e9:.1f} / {peak / 1e9:.1f} GFLOP/s", achieved / peak, 0.5))

    # Decoding: consume tokens with a chunked prefill, then time single recurrent steps on each state. The two
    # lengths are timed in alternation so that machine noise falls on both alike.
    steps = {}
    with torch.no_grad():
        for n_tok in decode_after:
            q, k, v, g, beta = _inputs(b, n_tok, h, d, d, seed=1)
            _, state = gated_delta_rule(q, k, v, g, beta, chunk_size=c, output_final_state=True)
            one = [x[:, -1:] for x in (q, k, v, g, beta)]
            steps[n_tok] = lambda one=one, state=state: gated_delta_rule(
                *one, initial_state=state, mode="recurrent", output_final_state=True
            )
        step_times = interleaved_medians(steps, rounds=max(25, reps))
    lo, hi = decode_after
    rows.append(TargetRow(f"decode step after {hi} vs {lo} tokens", "<= 1.25x",
                          f"{step_times[hi] * 1e3:.3f} ms / {step_times[lo] * 1e3:.3f} ms",
                          step_times[hi] / step_times[lo], 1.25, higher_is_better=False))

    mem = {}
    with torch.no_grad():
        for n_tok in lengths:
            x = _inputs(b, n_tok, h, d, d, seed=2)
            mem[n_tok] = peak_memory(lambda: ours(*x))
    per_tok = {n: mem[n] / n for n in lengths}
    rows.append(TargetRow(f"peak memory per token, {lengths[-1]} vs {lengths[0]}", "<= 1.25x",
                          f"{format_bytes(per_tok[lengths[-1]])} / {format_bytes(per_tok[lengths[0]])}",
                          per_tok[lengths[-1]] / per_tok[lengths[0]], 1.25, higher_is_better=False))

    print_table("times (median)", ("what", "seconds"), [(n, f"{s:.4f}") for n, s in times])
    print_table("decode step", ("tokens consumed", "ms per step"),
                [(n, f"{s * 1e3:.3f}") for n, s in step_times.items()])
    print_table("chunk forward peak memory", ("T", "peak", "per token"),
                [(n, format_bytes(mem[n]), format_bytes(per_tok[n])) for n in lengths])
    ok = print_targets("gated_delta_rule targets" + (" (--quick: not the targets)" if args.quick else ""), rows)
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
