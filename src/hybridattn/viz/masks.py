"""``hybridattn viz masks``: draw each attention pattern's mask, the "matrix of relations between tokens".

One panel per pattern: row ``i`` is a query, column ``j`` a key, dark = the pair interacts. Each title gives the
fraction of the ``T x T`` pairs the pattern keeps (causal attention keeps about half).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from hybridattn.ops import masks
from hybridattn.ops.masks import MaskSpec

HELP = "draw attention masks (sliding window, dilated, Longformer, Sparse Transformer, BigBird...) as a PNG"


def default_patterns(length: int) -> dict[str, MaskSpec]:
    """The library's patterns with sizes scaled to ``length`` so that their structure shows at any T."""
    w = max(2, length // 8)
    block = max(2, length // 16)
    stride = max(2, round(math.sqrt(length)))
    causal = masks.causal()
    # an explicit layout over 8 blocks: each block sees itself, the block two back and the first block
    n = min(8, length)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    layout = (i == j) | (i - j == 2) | (j == 0)
    return {
        "causal": causal,
        f"sliding_window({w}) & causal": masks.sliding_window(w) & causal,
        f"dilated({2 * w}, 2) & causal": masks.dilated(2 * w, 2) & causal,
        f"longformer({w // 2}, [0, {length // 2}])": masks.longformer(w // 2, [0, length // 2]),
        f"strided({stride}) & causal": masks.strided(stride) & causal,
        f"fixed({stride}, 1) & causal": masks.fixed(stride, 1) & causal,
        f"bigbird(1, 1, 2, block={block})": masks.bigbird(1, 1, 2, block=block, seed=0),
        f"bigbird(1, 1, 2, block={block}) & causal": masks.bigbird(1, 1, 2, block=block, seed=0) & causal,
        f"global_tokens([0, {length // 2}])": masks.global_tokens([0, length // 2]),
        f"block_sparse({n} x {n} layout)": masks.block_sparse(layout, block=-(-length // n)),
    }


def draw_masks(patterns: dict[str, MaskSpec], length: int, path, *, columns: int | None = None,
               dpi: int = 120) -> Path:
    """Draw ``patterns`` at ``T = length`` into the PNG ``path`` (``columns`` panels per row, default up to 5) and
    return the path."""
    columns = min(5, len(patterns)) if columns is None else columns
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(patterns) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, spec) in zip(axes.flat, patterns.items()):
        dense = spec.dense(length, length).any(0).any(0)  # union over batch rows / heads, if any
        ax.imshow(dense.to(torch.float32).numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        kept = spec.kept_pairs(length, length) / ((spec.batch_size or 1) * (spec.num_heads or 1))
        ax.set_title(f"{name}\n{kept / length**2:.0%} of pairs", fontsize=9)
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("on")
    fig.suptitle(f"attention masks at T = {length} (dark = query attends to key)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length", "-T", type=int, default=64, help="sequence length drawn (default 64)")
    parser.add_argument("--out", default="masks.png", help="output PNG (default masks.png)")
    parser.add_argument("--patterns", default=None,
                        help="comma-separated substrings selecting panels (default: all), e.g. 'bigbird,fixed'")
    parser.add_argument("--dpi", type=int, default=120)


def run(args: argparse.Namespace) -> int:
    if args.length < 2:
        raise SystemExit(f"--length: expected at least 2, received {args.length}")
    patterns = default_patterns(args.length)
    if args.patterns:
        wanted = [p.strip() for p in args.patterns.split(",") if p.strip()]
        patterns = {n: s for n, s in patterns.items() if any(w in n for w in wanted)}
        if not patterns:
            raise SystemExit(f"--patterns: no pattern matches {wanted}; choose from {list(default_patterns(64))}")
    path = draw_masks(patterns, args.length, args.out, dpi=args.dpi)
    print(f"wrote {path} ({len(patterns)} patterns at T={args.length})")
    return 0
