"""Softmax attention benchmark: ``python -m hybridattn.bench.softmax``.

Targets, measured in one run:

1. ``auto`` costs at most 5% more than calling torch SDPA directly at T = 4,096 (causal, fp32), forward and
   forward + backward: ratio ``time(sdpa) / time(auto) >= 0.95``. The two are timed in alternating rounds so that
   load on a shared machine hits both alike; medians over the rounds.
2. ``tiled`` at T = 32,768 (causal, forward) never builds the ``T x T`` matrix: its peak memory is at most 1% of
   that matrix's fp32 size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hybridattn.bench.measure import (
    TargetRow,
    default_device,
    format_bytes,
    median_time,
    peak_memory,
    print_targets,
)
from hybridattn.ops.softmax_attention import softmax_attention


def _inputs(t, heads, dim, device, *, grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(1, t, heads, dim, generator=g, device=device).requires_grad_(grad) for _ in range(3)]


def _alternating_medians(fns: dict, rounds: int, device) -> dict:
    """Median seconds of each callable, timing them in turn in every round (after one warm-up call each)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_time(fn, repeats=1, warmup=0, device=device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def auto_vs_sdpa(t, heads, dim, rounds, device) -> list[TargetRow]:
    rows = []
    for mode in ("forward", "forward+backward"):
        grad = mode != "forward"
        q, k, v = _inputs(t, heads, dim, device, grad=grad)
        qh, kh, vh = (x.detach().transpose(1, 2).requires_grad_(grad) for x in (q, k, v))

        def ours():
            o = softmax_attention(q, k, v, causal=True)
            if grad:
                o.sum().backward()

        def raw():
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
            if grad:
                o.sum().backward()

        with torch.set_grad_enabled(grad):
            med = _alternating_medians({"auto": ours, "sdpa": raw}, rounds, device)
        rows.append(TargetRow(
            f"auto vs SDPA, T={t:,}, {mode}", ">= 0.95",
            f"auto {med['auto'] * 1e3:.2f} ms, sdpa {med['sdpa'] * 1e3:.2f} ms",
            ratio=med["sdpa"] / med["auto"], threshold=0.95,
        ))
    return rows


def tiled_memory(t, heads, dim, device) -> TargetRow:
    q, k, v = _inputs(t, heads, dim, device)
    matrix = heads * t * t * 4
    with torch.no_grad():
        start = time.perf_counter()
        peak = peak_memory(lambda: softmax_attention(q, k, v, causal=True, backend="tiled"), device=device)
        seconds = time.perf_counter() - start
    return TargetRow(
        f"tiled peak memory vs T x T fp32, T={t:,}", "<= 0.01",
        f"{format_bytes(peak)} vs {format_bytes(matrix)} ({seconds:.1f} s incl. profiler)",
        ratio=peak / matrix, threshold=0.01, higher_is_better=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t-speed", type=int, default=4096, help="length for the auto vs SDPA timing")
    parser.add_argument("--t-memory", type=int, default=32768, help="length for the tiled memory target")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9, help="alternating timing rounds (median)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    device = default_device(args.device)
    rows = auto_vs_sdpa(args.t_speed, args.heads, args.head_dim, args.rounds, device)
    rows.append(tiled_memory(args.t_memory, 1, args.head_dim, device))
    ok = print_targets(
        f"softmax attention ({device.type}, causal fp32, H={args.heads} for speed, H=1 for memory, "
        f"D={args.head_dim}, median of {args.rounds} alternating rounds)",
        rows,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
