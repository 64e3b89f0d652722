"""Benchmark: does ``auto`` pick the faster of SDPA and block-sparse for sparse masks below ``DENSE_LIMIT``?
(``python -m hybridattn.bench.auto_policy``).

Below ``DENSE_LIMIT`` SDPA can take a sparse mask as a dense ``T x T`` boolean tensor and compute every tile, or
the block-sparse kernel can skip the tiles the mask empties. Short sequences favour SDPA (one fused call, no
per-block work), long ones block-sparse. This prints, per spec and length, the fraction of the kernel's own tiles
(``_tiles``: 32 x 32 below T=512, 64 x 32 from there) the mask keeps, the median forward and forward + backward
times of both backends (fp32, timed in alternation so that noise hits both alike), ``auto``'s choice, and PASS when
that choice is within ``--slack`` of the faster one in both modes, else MISS. ``docs/benchmarks.md`` holds a measured table.
"""

from __future__ import annotations

import argparse

import torch

from hybridattn.bench.measure import interleaved_medians
from hybridattn.ops import masks
from hybridattn.ops.block_sparse_attention import EMPTY, _tiles
from hybridattn.ops.softmax_attention import choose_backend, softmax_attention

#: (name, spec, B, Hq, Hkv): windows of two widths, a Sparse Transformer pattern and BigBird, B * Hq of 8-16
CASES = [
    ("window 64 causal", masks.sliding_window(64) & masks.causal(), 1, 16, 4),
    ("window 128 causal", masks.sliding_window(128) & masks.causal(), 1, 8, 2),
    ("window 32+32", masks.sliding_window(32, 32), 2, 4, 4),
    ("bigbird 1/1/1 blk 32", masks.bigbird(1, 1, 1, block=32), 1, 8, 2),
]
LENGTHS = (128, 256, 384, 512, 768, 1024)


def _density(spec, t: int) -> float:
    kept = (spec.block_layout(t, t, *_tiles(t, t)) != EMPTY).flatten(0, 1).any(0)
    return float(kept.float().mean())


def _timers(spec, b, hq, hkv, t, d, backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, generator=gen) for h in (hq, hkv, hkv))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            softmax_attention(q, k, v, mask=spec, backend=backend)

    def fwd_bwd():
        softmax_attention(*leaves, mask=spec, backend=backend).sum().backward()

    return fwd, fwd_bwd, (q, k, v)


def main(argv=None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds; medians over them")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--slack", type=float, default=1.10, help="PASS when auto's pick <= slack x the faster")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, D {args.dim}, fp32, medians of {args.rounds} alternating rounds (ms)\n")
    print("| spec | B x Hq/Hkv | T | density | sdpa fwd | bs fwd | sdpa f+b | bs f+b | auto | result |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    passed = True
    for name, spec, b, hq, hkv in CASES:
        for t in args.lengths:
            timers = {}
            for backend in ("sdpa", "block_sparse"):
                fwd, fwd_bwd, qkv = _timers(spec, b, hq, hkv, t, args.dim, backend)
                timers[backend, "fwd"], timers[backend, "f+b"] = fwd, fwd_bwd
            ms = {key: 1e3 * s for key, s in interleaved_medians(timers, rounds=args.rounds).items()}
            pick = choose_backend(*qkv, mask=spec, bias=None, softcap=None)
            ok = pick in ("sdpa", "block_sparse") and all(
                ms[pick, mode] <= args.slack * min(ms["sdpa", mode], ms["block_sparse", mode]) for mode in ("fwd", "f+b"))
            passed &= ok
            print(f"| {name} | {b} x {hq}/{hkv} | {t} | {_density(spec, t):.2f} | {ms['sdpa', 'fwd']:.1f} | "
                  f"{ms['block_sparse', 'fwd']:.1f} | {ms['sdpa', 'f+b']:.1f} | {ms['block_sparse', 'f+b']:.1f} | "
                  f"{pick} | {'PASS' if ok else 'MISS'} |", flush=True)
    print(f"\n{'PASS' if passed else 'MISS'}: auto's choice within {args.slack}x of the faster backend at every point")
    return passed


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
