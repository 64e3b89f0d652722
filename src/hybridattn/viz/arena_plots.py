"""Plots of arena results (matplotlib, Agg backend: no display needed).

Each function takes the ``results`` dict of :func:`hybridattn.train.arena.run_arena`, writes one PNG and
returns its path:

- :func:`plot_accuracy_vs_state`: accuracy against cache bytes at the evaluation length (log x) — zoology's
  recall-vs-state-size picture: softmax buys recall with a cache that grows with the context;
- :func:`plot_accuracy_bars`: accuracy per mechanism and ratio, mean with the seed spread (min..max) and
  every seed as a dot;
- :func:`plot_inference`: per-token decode latency and cache bytes against context length;
- :func:`plot_learning_curves`: training loss against step, one line per seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(row: dict, widths: set) -> str:
    return row["model"] if len(widths) == 1 else f"{row['model']} d={row['width']}"


def _colors(labels: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(dict.fromkeys(labels))}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_state(results: dict, path) -> Path:
    rows = [r for r in results["summary"] if r["cache_bytes_eval"]]
    colors = _colors([r["model"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for task in dict.fromkeys(r["task"] for r in rows):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r["cache_bytes_eval"], r["accuracy_mean"], r["accuracy_std"])
                         for r in rows if r["task"] == task and r["model"] == model)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=colors[model], label=f"{model} ({task})")
    ax.set_xscale("log")
    ax.set_xlabel("cache bytes at the evaluation length (KV + state), log scale")
    ax.set_ylabel("accuracy (held-out)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Recall vs state size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_accuracy_bars(results: dict, path) -> Path:
    summary, runs = results["summary"], results["runs"]
    widths = {r["width"] for r in summary}
    labels = [f"{r['task']}: {_label(r, widths)}" for r in summary]
    colors = _colors([r["model"] for r in summary])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(summary) + 2), 4.2))
    for i, r in enumerate(summary):
        lo, hi = r["accuracy_mean"] - r["accuracy_min"], r["accuracy_max"] - r["accuracy_mean"]
        ax.bar(i, r["accuracy_mean"], color=colors[r["model"]], alpha=0.8,
               yerr=[[lo], [hi]], capsize=4)
        seeds = [x["accuracy"] for x in runs
                 if (x["task"], x["model"], x["width"]) == (r["task"], r["model"], r["width"])]
        ax.scatter([i] * len(seeds), seeds, color="black", s=10, zorder=3)
        ax.text(i, r["accuracy_mean"] + 0.02, f"{r['accuracy_mean']:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(summary)), [f"{lab}\n({r['ratio']})" for lab, r in zip(labels, summary)],
                  fontsize=7, rotation=20, ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy: mean, seed range, seeds")
    ax.set_title("Accuracy per mechanism and linear:softmax ratio")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def plot_inference(results: dict, path) -> Path:
    summary = results["summary"]
    widths = {r["width"] for r in summary}
    colors = _colors([r["model"] for r in summary])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4.0))
    seen = set()
    for r in summary:
        key = (r["model"], r["width"])
        if key in seen:     # latency and memory do not depend on the task beyond the vocabulary
            continue
        seen.add(key)
        lab = _label(r, widths)
        ax_t.plot(r["contexts"], [s * 1e3 for s in r["decode_s"]], marker="o", color=colors[r["model"]], label=lab)
        if r.get("decode_q1_s"):  # the quartiles of the timed steps
            ax_t.fill_between(r["contexts"], [s * 1e3 for s in r["decode_q1_s"]],
                              [s * 1e3 for s in r["decode_q3_s"]], color=colors[r["model"]], alpha=0.2)
        if all(b is not None for b in r["cache_bytes"]):
            ax_m.plot(r["contexts"], r["cache_bytes"], marker="o", color=colors[r["model"]], label=lab)
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("decode latency per token (ms, median and quartiles)")
    ax_t.set_title("Per-token decode latency")
    ax_m.set_yscale("log")
    ax_m.set_ylabel("cache bytes (KV + state), batch 1")
    ax_m.set_title("Cache memory")
    return _save(fig, Path(path))


def plot_heldout_curves(results: dict, path) -> Path:
    """Held-out accuracy at each periodic evaluation, one line per seed: when each model learned the task."""
    runs = [r for r in results["runs"] if len(r.get("evals") or []) > 1]
    tasks = list(dict.fromkeys(r["task"] for r in runs)) or ["(no periodic evaluations)"]
    widths = {r["width"] for r in runs}
    colors = _colors([r["model"] for r in runs])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        labelled = set()
        text = task == "text"
        for r in (x for x in runs if x["task"] == task):
            lab = _label(r, widths)
            if text:  # bits per byte against the training tokens seen: how fast each model learns
                xs = [e["step"] * r.get("tokens_per_step", 1) for e in r["evals"]]
                ys = [e["loss"] / math.log(2) for e in r["evals"]]
            else:
                xs, ys = [e["step"] for e in r["evals"]], [e["accuracy"] for e in r["evals"]]
            ax.plot(xs, ys, marker=".", color=colors[r["model"]], alpha=0.8, lw=1,
                    label=None if lab in labelled else lab)
            labelled.add(lab)
        if text:
            ax.set_xlabel("training tokens")
            ax.set_ylabel("held-out bits per byte")
            ax.set_title("Held-out bits per byte during training (one line per seed)")
        else:
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("step")
            ax.set_ylabel("held-out accuracy")
            ax.set_title(f"Held-out accuracy during training: {task} (one line per seed)")
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_learning_curves(results: dict, path) -> Path:
    runs = results["runs"]
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    widths = {r["width"] for r in runs}
    colors = _colors([r["model"] for r in runs])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        labelled = set()
        for r in (x for x in runs if x["task"] == task):
            lab = _label(r, widths)
            steps = [c["step"] for c in r["curve"]]
            ax.plot(steps, [c["loss"] for c in r["curve"]], color=colors[r["model"]], alpha=0.7, lw=1,
                    label=None if lab in labelled else lab)
            labelled.add(lab)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (scored positions, nats)")
        ax.set_title(f"Learning curves: {task} (one line per seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


PLOTS = {
    "accuracy_vs_state.png": plot_accuracy_vs_state,
    "accuracy.png": plot_accuracy_bars,
    "inference.png": plot_inference,
    "learning_curves.png": plot_learning_curves,
    "heldout_accuracy.png": plot_heldout_curves,
}


def plot_all(results: dict, out_dir) -> list[Path]:
    """Every arena plot into ``out_dir`` (and the capacity panel when the results have one); returns the PNG
    paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [fn(results, out_dir / name) for name, fn in PLOTS.items()]
    if results.get("capacity"):
        from hybridattn.viz.capacity import plot_capacity

        paths.insert(0, plot_capacity(results["capacity"], out_dir / "capacity.png"))
    return paths
