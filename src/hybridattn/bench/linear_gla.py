"""Benchmark: the gated-linear-attention family on CPU (``python -m hybridattn.bench.linear_gla``).

At B=1, T=4,096, H=8, Dk=Dv=128, fp32 (the gated delta rule benchmark's shape), for ``linear_attention``, ``simple_gla`` and ``gla``
in chunk mode, each printed as a ratio measured in this run with PASS / MISS:

- FLOP efficiency: counted FLOPs / time against this run's fp32 matmul throughput, forward and forward +
  backward (backward counted as 2x forward), held to the issue's 50% bar (the count's formula is printed);
- recurrent decoding (``simple_gla``, ``gla``): one step's time after 64K consumed tokens within 1.25x of that
  after 1K (the state has a fixed size);
- chunk-mode peak memory grows linearly in T (``simple_gla``, forward): bytes per token at 64K within 1.25x of
  that at 4K.

``--quick`` runs the same code at small sizes as a smoke test (its ratios are not the targets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridattn.bench.linear import parse_args
from hybridattn.bench.measure import (
    TargetRow, format_bytes, interleaved_medians, matmul_flops_per_second, median_time, peak_memory,
    print_table, print_targets,
)
from hybridattn.ops import gla, linear_attention, simple_gla

FLOP_FORMULA = "B*H*T*(2*C*(Dk + Dv) + 4*Dk*Dv)"


def chunk_flops(b: int, t: int, h: int, dk: int, dv: int, c: int) -> int:
    """Matmul FLOPs of the chunk form per ``FLOP_FORMULA``: per chunk and head ``Q K^T`` and ``A V``
    (``2 C^2 (Dk + Dv)``, the full ``C x C`` blocks that are computed) and ``K^T V``, ``Q S`` (``4 C Dk Dv``).
    Elementwise work (decays, masks) is left out, which only lowers the reported efficiency."""
    return b * h * t * (2 * c * (dk + dv) + 4 * dk * dv)


def _inputs(name, b, t, h, dk, dv, *, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, h, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, t, h, dv, generator=gen)
    gates = {
        "linear_attention": (),
        "simple_gla": (F.logsigmoid(torch.randn(b, t, h, generator=gen) + 2.0),),
        # GLA's layer divides its gate logits by 16 (fla's gate_logit_normalizer)
        "gla": (F.logsigmoid(torch.randn(b, t, h, dk, generator=gen)) / 16,),
    }[name]
    return [x.requires_grad_(grad) for x in (q, k, v, *gates)]


OPS = {"linear_attention": linear_attention, "simple_gla": simple_gla, "gla": gla}


def _fwd_bwd(fn, inputs, grad_out):
    def step():
        o, _ = fn(*inputs)
        o.backward(grad_out)  # a dense gradient, as a real loss gives (o.sum() would be a broadcast one)
        for x in inputs:
            x.grad = None

    return step


def main(argv=None) -> int:
    args, (b, t, h, d), lengths, decode_after = parse_args(argv, __doc__.split("\n")[0])
    c, reps = args.chunk_size, args.repeats
    print(f"GLA family at B={b} T={t} H={h} Dk=Dv={d} fp32, chunk_size={c}, {torch.get_num_threads()} threads, "
          f"medians of {reps}")

    peak = matmul_flops_per_second(torch.float32, torch.device("cpu"))
    flops = chunk_flops(b, t, h, d, d, c)
    print(f"counted FLOPs = {FLOP_FORMULA} = {flops / 1e9:.2f} GFLOP forward (x3 forward+backward); "
          f"fp32 matmul {peak / 1e9:.1f} GFLOP/s")
    rows, times = [], []
    for name, op in OPS.items():
        run = lambda *x, op=op: op(*x, chunk_size=c)  # noqa: E731
        with torch.no_grad():
            x = _inputs(name, b, t, h, d, d)
            t_fwd = median_time(lambda: run(*x), repeats=reps, warmup=1)
        x = _inputs(name, b, t, h, d, d, grad=True)
        t_fb = median_time(_fwd_bwd(run, x, torch.randn(b, t, h, d)), repeats=max(3, reps // 2), warmup=1)
        times += [(f"{name} chunk forward", t_fwd), (f"{name} chunk forward+backward", t_fb)]
        for what, seconds, count in (("fwd", t_fwd, flops), ("fwd+bwd", t_fb, 3 * flops)):
            achieved = count / seconds
            rows.append(TargetRow(f"{name} FLOP efficiency ({what})", ">= 50% of matmul",
                                  f"{achieved / 1e9:.1f} / {peak / 1e9:.1f} GFLOP/s", achieved / peak, 0.5))

    # Decoding: a chunked prefill, then single recurrent steps on each state, the two lengths timed in
    # alternation so that machine noise falls on both alike.
    step_rows = []
    for name in ("simple_gla", "gla"):
        steps = {}
        with torch.no_grad():
            for n_tok in decode_after:
                x = _inputs(name, b, n_tok, h, d, d, seed=1)
                _, state = OPS[name](*x, chunk_size=c, output_final_state=True)
                one = [y[:, -1:] for y in x]
                steps[n_tok] = lambda one=one, state=state, op=OPS[name]: op(
                    *one, initial_state=state, mode="recurrent", output_final_state=True)
            step_times = interleaved_medians(steps, rounds=max(25, reps))
        lo, hi = decode_after
        step_rows += [(name, n, f"{s * 1e3:.3f}") for n, s in step_times.items()]
        rows.append(TargetRow(f"{name} decode step after {hi} vs {lo} tokens", "<= 1.25x",
                              f"{step_times[hi] * 1e3:.3f} ms / {step_times[lo] * 1e3:.3f} ms",
                              step_times[hi] / step_times[lo], 1.25, higher_is_better=False))

    mem = {}
    with torch.no_grad():
        for n_tok in lengths:
            x = _inputs("simple_gla", b, n_tok, h, d, d, seed=2)
            mem[n_tok] = peak_memory(lambda: simple_gla(*x, chunk_size=c))
    per_tok = {n: mem[n] / n for n in lengths}
    rows.append(TargetRow(f"simple_gla peak memory per token, {lengths[-1]} vs {lengths[0]}", "<= 1.25x",
                          f"{format_bytes(per_tok[lengths[-1]])} / {format_bytes(per_tok[lengths[0]])}",
                          per_tok[lengths[-1]] / per_tok[lengths[0]], 1.25, higher_is_better=False))

    print_table("times (median)", ("what", "seconds"), [(n, f"{s:.4f}") for n, s in times])
    print_table("decode step", ("op", "tokens consumed", "ms per step"), step_rows)
    print_table("simple_gla chunk forward peak memory", ("T", "peak", "per token"),
                [(n, format_bytes(mem[n]), format_bytes(per_tok[n])) for n in lengths])
    ok = print_targets("GLA family targets" + (" (--quick: not the targets)" if args.quick else ""), rows)
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
