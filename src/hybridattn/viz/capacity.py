"""``hybridattn viz capacity``: how many key-value pairs one layer's memory recalls, against ``N / Dk`` (no
training; see :mod:`hybridattn.tasks.capacity`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HELP = "recall of N key-value pairs written into one layer's memory, against N / Dk (training-free, seconds)"


def plot_capacity(curves: dict, path) -> Path:
    """Two panels (keys spread as well as Dk allows; random keys): recall against ``N / Dk`` per memory, with the
    capacity line at ``N = Dk``."""
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0), sharey=True)
    titles = {"frame": "keys as spread as Dk allows (orthonormal up to N = Dk)", "random": "random unit keys"}
    cmap = plt.get_cmap("tab10")
    for ax, (keys, table) in zip(axes, curves["curves"].items()):
        for i, (name, ys) in enumerate(table.items()):
            ax.plot(curves["ratios"], ys, marker="o", color=cmap(i), label=name,
                    linestyle="--" if "gated" in name else "-")
        ax.axvline(1.0, color="black", linewidth=1, alpha=0.6)
        ax.text(1.04, 0.55, "capacity: N = Dk", fontsize=8, alpha=0.8, rotation=90)
        ax.set_title(titles.get(keys, keys), fontsize=10)
        ax.set_xlabel(f"pairs stored / key dims  (N / Dk, Dk = {curves['dk']})")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"recall (nearest of the N values + 256 others, mean of {curves['trials']} draws)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle("One layer's memory: a fixed state blurs past N = Dk pairs; softmax over the keys does not",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dk", type=int, default=16, help="key dimensions of the memory (default 16)")
    parser.add_argument("--trials", type=int, default=8, help="random draws per point (default 8)")
    parser.add_argument("--out", default="capacity.png", help="PNG to write (a .json with the numbers beside it)")


def run(args: argparse.Namespace) -> int:
    from hybridattn.tasks.capacity import capacity_curves

    curves = capacity_curves(dk=args.dk, trials=args.trials)
    path = plot_capacity(curves, args.out)
    path.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")
    for keys, table in curves["curves"].items():
        print(f"{keys} keys, recall at N/Dk = " + " ".join(f"{r:g}" for r in curves["ratios"]))
        for name, ys in table.items():
            print(f"  {name:38s} " + " ".join(f"{y:.2f}" for y in ys))
    print(f"wrote {path}")
    return 0
