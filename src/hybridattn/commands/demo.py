"""``hybridattn demo``: the quadratic table of softmax attention, measured.

For each sequence length it runs dense softmax attention (the ``naive`` backend, which materialises the
``T x T`` matrix) and the ``tiled`` backend (online softmax, memory ``O(T * block)``) on the same inputs and prints
their measured peak memory and time next to the size of the ``T x T`` matrix in fp32. When the dense run would not
fit in the memory this machine has free, it is skipped and the size it would need is printed instead.
"""

from __future__ import annotations

import argparse
import time

import torch

from hybridattn.bench.measure import (
    default_device,
    format_bytes,
    format_seconds,
    median_time,
    peak_memory,
    print_table,
)
from hybridattn.ops.softmax_attention import softmax_attention

HELP = "measure dense vs tiled softmax attention memory and time for T = 512 / 4,096 / 32,768"

#: Live T x T fp32 tensors the naive path holds at its peak (logits, shifted logits, exp, weights).
DENSE_COPIES = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096, 32768], help="sequence lengths")
    parser.add_argument("--heads", type=int, default=1, help="attention heads (B = 1)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median); 1 for T >= 16,384")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--max-dense-gib", type=float, default=None,
                        help="run dense only when it needs at most this many GiB (default: a third of free memory)")


def available_bytes(device: torch.device) -> int:
    """Memory free for a new allocation on ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: do not risk the dense run


def _measure(fn, repeats: int, device) -> tuple[int, float]:
    """Peak bytes and median seconds. With one repeat the memory run is also the timed run: the long lengths cost
    seconds per call, and recording a few thousand large ops adds only milliseconds to that."""
    if repeats == 1:
        start = time.perf_counter()
        peak = peak_memory(fn, device=device)
        return peak, time.perf_counter() - start
    peak = peak_memory(fn, device=device)
    return peak, median_time(fn, repeats=repeats, warmup=1, device=device)


def run(args: argparse.Namespace) -> int:
    device = default_device(args.device)
    limit = args.max_dense_gib * 2**30 if args.max_dense_gib is not None else available_bytes(device) / 3
    rows = []
    for t in args.lengths:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, t, args.heads, args.head_dim, generator=g, device=device) for _ in range(3))
        matrix = args.heads * t * t * 4
        repeats = 1 if t >= 16384 else args.repeats
        with torch.no_grad():
            tiled = lambda: softmax_attention(q, k, v, causal=True, backend="tiled")  # noqa: E731
            dense = lambda: softmax_attention(q, k, v, causal=True, backend="naive")  # noqa: E731
            tiled_peak, tiled_time = _measure(tiled, repeats, device)
            need = DENSE_COPIES * matrix
            if need <= limit:
                dense_peak, dense_time = _measure(dense, repeats, device)
                ratio = f"{dense_peak / max(tiled_peak, 1):,.0f}x"
                dense_cells = (format_bytes(dense_peak), format_seconds(dense_time), ratio)
            else:
                dense_cells = (f"skipped (would need ~{format_bytes(need)})", "-", "-")
        rows.append((f"{t:,}", format_bytes(matrix), *dense_cells[:2], format_bytes(tiled_peak),
                     format_seconds(tiled_time), dense_cells[2]))
    print_table(
        f"Causal softmax attention, B=1, H={args.heads}, D={args.head_dim}, fp32, forward, {device.type} "
        f"(peak = bytes allocated above the inputs; time = median)",
        ("T", "T x T matrix", "dense peak", "dense time", "tiled peak", "tiled time", "dense / tiled memory"),
        rows,
    )
    return 0
