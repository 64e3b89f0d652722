"""Benchmark: sparse softmax attention (``python -m hybridattn.bench.sparse``).

Targets, each printed as a ratio measured in this run with PASS / MISS:

- sliding window W=512, causal, T=16,384, H=8, D=64, fp32, forward + backward: at least 6x faster than dense
  causal SDPA, with at most 1/8 of its peak memory;
- the same window's time grows linearly from T=4K to 64K (time per token at the longest length within 1.5x of
  that at the shortest; the table is printed);
- Longformer (window 256 on each side + 16 global tokens) and BigBird (window 1 block, 2 global blocks, 3 random
  blocks of 64) at T=16K, forward: time within 1.5x of ``kept pairs * 4 * D`` FLOPs at the same run's fp32
  matmul throughput (the median over calls of each call's time against the matmul rate measured right after it).

Not a target, printed for reference first: the window's peak memory against causal attention that materialises
T x T (SDPA's math backend) at ``--materialised-length`` (4,096: its backward needs ~1.5 GiB there, T^2 growth). The
memory target's baseline, SDPA's default causal kernel, is flash-style on a CPU (O(T) memory).

Planning (block layout and tile masks) is done once per spec and length, as a layer does, and is timed apart.
``--quick`` runs the same code at small sizes (a smoke test; its ratios are not the targets).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hybridattn.bench.measure import (
    TargetRow, default_device, format_bytes, matmul_flops_per_second, median_time, peak_memory, print_table,
    print_targets,
)
from hybridattn.ops import masks
from hybridattn.ops.block_sparse_attention import block_sparse_attention, cached_plan, compiled_workspace_bytes


def _inputs(t, heads, dim, device, *, grad):
    return [torch.randn(1, t, heads, dim, device=device, requires_grad=grad) for _ in range(3)]


def _sparse_step(spec, q, k, v, block_q, block_k, *, backward):
    t = q.shape[1]
    plan = cached_plan(spec, t, t, block_q, block_k, device=q.device)

    def step():
        o = block_sparse_attention(q, k, v, spec, block_q=block_q, block_k=block_k, plan=plan)
        if backward:
            o.sum().backward()
        q.grad = k.grad = v.grad = None

    return step


def _dense_causal_step(q, k, v):
    def step():
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        o.sum().backward()
        q.grad = k.grad = v.grad = None

    return step


def _materialised_causal_step(q, k, v):
    """Dense causal attention that materialises the T x T scores (SDPA's math backend), forward + backward."""
    def step():
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True)
        o.sum().backward()
        q.grad = k.grad = v.grad = None

    return step


def materialised_memory(t, heads, dim, window, block, block_k, device) -> str:
    """Peak memory of the window against dense attention that materialises T x T, at a length where that fits.

    Not a target: the issue's memory row compares with SDPA's default causal kernel, which on a CPU is flash-style
    (O(T) memory), so this line shows the comparison that row presumes. Run first in the process, so that the
    compiled forward's kept workspace is exactly what this length needs.
    """
    q, k, v = _inputs(t, heads, dim, device, grad=True)
    spec = masks.sliding_window(window) & masks.causal()
    sparse = _sparse_step(spec, q, k, v, block, block_k, backward=True)
    m_sparse = peak_memory(sparse, device=device)
    m_sparse += compiled_workspace_bytes()
    m_dense = peak_memory(_materialised_causal_step(q, k, v), device=device)
    return (f"for reference, window {window} causal T={t} fwd+bwd peak memory vs causal attention that materialises "
            f"T x T (SDPA math backend): {format_bytes(m_sparse)} / {format_bytes(m_dense)} = "
            f"{m_sparse / max(m_dense, 1):.3f} (not a target)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--block", type=int, default=64, help="query tile of the block-sparse kernel")
    p.add_argument("--block-k", type=int, default=32, help="key tile of the block-sparse kernel (BigBird: 64)")
    p.add_argument("--scaling", type=str, default="4096,8192,16384,32768,65536")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-repeats", type=int, default=2, help="repeats of the (slow) dense baseline")
    p.add_argument("--fwd-repeats", type=int, default=9,
                   help="Longformer / BigBird forward calls, each paired with a matmul throughput measurement")
    p.add_argument("--materialised-length", type=int, default=4096,
                   help="length of the reference comparison with attention that materialises T x T (0: skip)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives stable numbers on an oversubscribed machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.length, args.window, args.scaling, args.repeats = 1024, 128, "512,1024,2048", 1
        args.dense_repeats, args.fwd_repeats = 1, 3
        args.materialised_length = min(args.materialised_length, 512)
    dev = default_device(args.device)
    t, h, d, w, blk, blk_k = args.length, args.heads, args.dim, args.window, args.block, args.block_k
    torch.manual_seed(0)
    rows: list[TargetRow] = []
    reference_line = None
    if args.materialised_length:
        reference_line = materialised_memory(args.materialised_length, h, d, w, blk, blk_k, dev)
        print(reference_line, flush=True)

    # 1. sliding window vs dense causal SDPA, forward + backward
    window = masks.sliding_window(w) & masks.causal()
    q, k, v = _inputs(t, h, d, dev, grad=True)
    start = time.perf_counter()
    sparse = _sparse_step(window, q, k, v, blk, blk_k, backward=True)
    plan_s = time.perf_counter() - start
    dense = _dense_causal_step(q, k, v)
    sparse()  # warm-up
    # dense and sparse alternate so that both see the same load on a shared machine; one dense fwd+bwd at 16K
    # takes about a minute on a CPU, hence fewer dense repeats
    dense_times, sparse_times = [], []
    for i in range(max(args.repeats, args.dense_repeats)):
        if i < args.dense_repeats:
            dense_times.append(median_time(dense, repeats=1, warmup=0, device=dev))
        if i < args.repeats:
            sparse_times.append(median_time(sparse, repeats=1, warmup=0, device=dev))
        print(f"round {i}: dense {dense_times[-1]:.2f} s, sparse {sparse_times[-1]:.2f} s", flush=True)
    t_sparse, t_dense = statistics.median(sparse_times), statistics.median(dense_times)
    # the compiled forward's workspace (k and v head-major, kept between calls) is not a torch allocation: added
    m_sparse, m_dense = peak_memory(sparse, device=dev), peak_memory(dense, device=dev)
    workspace = compiled_workspace_bytes()
    m_sparse += workspace
    rows.append(TargetRow(f"window {w} causal T={t} fwd+bwd: speed-up vs dense causal SDPA", ">= 6x",
                          f"{t_dense:.2f} s / {t_sparse:.2f} s (medians of {len(dense_times)} / {len(sparse_times)}, "
                          f"interleaved; plan {plan_s:.2f} s once)", t_dense / t_sparse, 6.0))
    rows.append(TargetRow(f"window {w} causal T={t} fwd+bwd: peak memory / dense", "<= 1/8",
                          f"{format_bytes(m_sparse)} (incl. {format_bytes(workspace)} kernel workspace) / "
                          f"{format_bytes(m_dense)}", m_sparse / max(m_dense, 1), 1 / 8,
                          higher_is_better=False))
    del q, k, v

    # 2. linear growth with T
    lengths = [int(x) for x in args.scaling.split(",")]
    table, per_token = [], []
    for n in lengths:
        q, k, v = _inputs(n, h, d, dev, grad=True)
        seconds = median_time(_sparse_step(window, q, k, v, blk, blk_k, backward=True), repeats=args.repeats,
                              warmup=0, device=dev)
        print(f"sliding window T={n}: {seconds:.3f} s", flush=True)
        per_token.append(seconds / n)
        table.append((n, f"{seconds:.3f}", f"{1e6 * seconds / n:.1f}", f"{per_token[-1] / per_token[0]:.2f}"))
        del q, k, v
    print_table(f"sliding window {w} causal, fwd+bwd, H={h} D={d} fp32 on {dev}",
                ("T", "seconds", "us / token", "per-token vs first"), table)
    rows.append(TargetRow(f"window {w}: time per token T={lengths[-1]} vs T={lengths[0]}", "<= 1.5 (linear)",
                          f"{1e6 * per_token[-1]:.1f} vs {1e6 * per_token[0]:.1f} us", per_token[-1] / per_token[0],
                          1.5, higher_is_better=False))

    # 3. Longformer and BigBird vs matmul throughput, forward
    specs = {
        "Longformer (window 256 + 16 global)": masks.longformer(256, list(range(16))),
        "BigBird (window 1, 2 global, 3 random, block 64)": masks.bigbird(1, 2, 3, block=64, seed=0),
    }
    for name, spec in specs.items():
        q, k, v = _inputs(t, h, d, dev, grad=False)
        block_k = 64 if "BigBird" in name else blk_k  # BigBird's own blocks are the key tiles
        step = _sparse_step(spec, q, k, v, blk, block_k, backward=False)
        step()  # warm-up
        # each call is paired with the matmul throughput measured right after it, so that both see the same load
        # (steal time on a shared VM moves either by 10-40% within a minute); the ratio is the median of the pairs'
        samples = [(median_time(step, repeats=1, warmup=0, device=dev), matmul_flops_per_second(torch.float32, dev))
                   for _ in range(args.fwd_repeats)]
        flop = spec.kept_pairs(t, t) * h * 4 * d
        ratios = sorted(seconds * flops / flop for seconds, flops in samples)
        seconds = statistics.median(x for x, _ in samples)
        flops = statistics.median(f for _, f in samples)
        print(f"{name}: {seconds:.3f} s, ideal {flop / flops:.3f} s, ratios " + " ".join(f"{r:.2f}" for r in ratios),
              flush=True)
        rows.append(TargetRow(f"{name} T={t} fwd: time / (pairs * 4D / matmul FLOP/s)", "<= 1.5x",
                              f"{seconds:.3f} s vs ideal {flop / flops:.3f} s ({flops / 1e9:.0f} GFLOP/s); median of "
                              f"{len(ratios)} paired ratios, range {ratios[0]:.2f}-{ratios[-1]:.2f}",
                              statistics.median(ratios), 1.5, higher_is_better=False))
        del q, k, v
    ok = print_targets(f"sparse attention targets (T={t}, H={h}, D={d}, fp32, {dev})", rows)
    if reference_line:
        print(reference_line)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
