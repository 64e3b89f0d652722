"""Attention matrices of a trained model, softmax and linear side by side (``hybridattn viz attention``).

A softmax layer's matrix is its attention weights ``softmax(q k^T)``. A linear layer has no such matrix
in its recurrent form, but its parallel form is ``o = A v`` with an implicit ``T x T`` matrix ``A``
(for the gated delta rule: the decays and the delta-rule corrections folded in), which the linear ops return
with ``mode="parallel", return_attention=True``. Drawing both shows the "matrix of relations" each layer
uses and how much blurrier the linear layers' relations are.

Capture works on any ``HybridLM`` without changing it: during one forward pass, linear mixers run their op
in parallel form (same outputs as the chunk form, up to rounding), and the softmax layers' attention calls
go through the naive backend, which returns weights.

Shape legend: H heads, T tokens.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

HELP = "draw each softmax head's attention matrix and each linear layer's implicit one for a trained model"


@contextlib.contextmanager
def _capturing(model, records: list[dict]):
    import hybridattn.layers.attention as attention_layer

    current = {"layer": None, "mixer": None}
    hooks, patched = [], []
    original_softmax = attention_layer.softmax_attention

    def softmax_with_weights(q, k, v, **kwargs):
        kwargs.update(backend="naive", return_weights=True)
        o, w = original_softmax(q, k, v, **kwargs)
        records.append({"layer": current["layer"], "mixer": current["mixer"], "kind": "softmax",
                        "weights": w[0].detach().float().cpu()})                     # (H, T, T)
        return o

    def mix_parallel(op, *args, cache, token_mask, **kwargs):
        o, _, a = op(*args, mode="parallel", return_attention=True, **kwargs)
        records.append({"layer": current["layer"], "mixer": current["mixer"], "kind": "linear (implicit)",
                        "weights": a[0].detach().float().cpu()})                     # (H, T, T)
        return o

    for i, (block, name) in enumerate(zip(model.layers, model.config.layer_types)):
        def pre(module, args, i=i, name=name):
            current.update(layer=i, mixer=name)
        hooks.append(block.register_forward_pre_hook(pre))
        if hasattr(block.mixer, "_mix"):
            block.mixer._mix = mix_parallel       # instance attribute shadows the method for this pass only
            patched.append(block.mixer)
    attention_layer.softmax_attention = softmax_with_weights
    try:
        yield
    finally:
        attention_layer.softmax_attention = original_softmax
        for h in hooks:
            h.remove()
        for mixer in patched:
            del mixer._mix


@torch.no_grad()
def attention_maps(model, input_ids: torch.Tensor) -> list[dict]:
    """Every layer's attention matrices for one sequence.

    Args:
        model: a ``HybridLM``.
        input_ids: ``[1, T]`` token ids (or ``[T]``, or a list of ids).

    Returns:
        One dict per layer, in order: ``layer``, ``mixer`` (its registry name), ``kind`` ("softmax" or
        "linear (implicit)"), ``weights`` ``[H, T, T]`` float32 (rows: queries, columns: keys).

    Raises:
        ValueError: ``input_ids`` is not a single sequence.
    """
    if isinstance(input_ids, (list, tuple)):  # a plain list of ids is one sequence
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a tensor [1, T] or a list of ids, received {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected shape [1, T], received {tuple(input_ids.shape)}")
    records: list[dict] = []
    was_training = model.training
    model.eval()
    with _capturing(model, records):
        model(input_ids)
    model.train(was_training)
    return records


def plot_attention_maps(maps: list[dict], path, *, tokens: list[str] | None = None, max_heads: int = 4,
                        title: str | None = None) -> Path:
    """One row per layer, one column per head (up to ``max_heads``), query on the y axis and key on the x axis,
    one colour scale per row with its bar (softmax weights and the linear layers' implicit weights, as
    magnitudes, are comparable within a row); ``title`` on top (e.g. the model's prediction). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = min(max_heads, max(m["weights"].shape[0] for m in maps))
    t = maps[0]["weights"].shape[-1]
    labelled = tokens is not None and t <= 48
    size = 3.2 if labelled else 2.6
    fig, axes = plt.subplots(len(maps), heads, figsize=(size * heads + 1.0, size * len(maps) + 0.6), squeeze=False)
    fig.subplots_adjust(hspace=0.35)  # before the colour bars: they take their room from the adjusted axes
    for r, (row, m) in enumerate(zip(axes, maps)):
        shown = m["weights"][:heads].abs()  # implicit linear weights can be negative (delta-rule corrections)
        vmax = float(shown.max()) or 1.0
        image = None
        for h, ax in enumerate(row):
            if h >= m["weights"].shape[0]:
                ax.axis("off")
                continue
            image = ax.imshow(shown[h].numpy(), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
            ax.set_title(f"layer {m['layer']} {m['mixer']}, head {h}", fontsize=8)
            if r == len(maps) - 1:
                ax.set_xlabel("key (attended token)", fontsize=8)
            if h == 0:
                ax.set_ylabel("query (current token)", fontsize=8)
            if labelled:
                ax.set_xticks(range(t), tokens, fontsize=7, rotation=90)
                ax.set_yticks(range(t), tokens, fontsize=7)
            else:
                ax.tick_params(labelsize=7)
        if image is not None:
            bar = fig.colorbar(image, ax=list(row), shrink=0.85, pad=0.02)
            bar.ax.tick_params(labelsize=7)
            bar.set_label(f"{m['kind']}: " + ("|weight|" if m["kind"] != "softmax" else "weight"), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10, y=0.93)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def encode_text(text: str, vocab_size: int) -> torch.Tensor:
    """Bytes of ``text`` as ids ``[1, T]`` (byte-level models); ids must fit the vocabulary.

    Raises:
        ValueError: a byte is outside ``[0, vocab_size)`` or the text is empty.
    """
    data = list(text.encode())
    if not data:
        raise ValueError("text: expected at least one character, received ''")
    if max(data) >= vocab_size:
        raise ValueError(f"text: expected bytes < vocab_size={vocab_size} (a byte-level model), received byte "
                         f"{max(data)}; pass --ids for models with other vocabularies")
    return torch.tensor([data])


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a saved HybridLM (config.json + model.safetensors), e.g. an arena models/ entry")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="input text, encoded as bytes (byte-level models)")
    source.add_argument("--ids", help="input token ids, space-separated")
    parser.add_argument("--out", default="attention.png", help="PNG to write")
    parser.add_argument("--max-heads", type=int, default=4)


def run(args) -> int:
    from hybridattn.models import HybridLM

    model = HybridLM.from_pretrained(args.checkpoint)
    if args.text is not None:
        ids = encode_text(args.text, model.config.vocab_size)
        tokens = [chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in ids[0].tolist()]
    else:
        ids = torch.tensor([[int(x) for x in args.ids.split()]])
        tokens = [str(x) for x in ids[0].tolist()]
    maps = attention_maps(model, ids)
    with torch.no_grad():
        predicted = int(model(ids, logits_at=torch.tensor([-1]))[0, -1].argmax())
    shown = chr(predicted) if args.text is not None and 32 <= predicted < 127 else str(predicted)
    title = f"{Path(args.checkpoint).name}: after '{tokens[-1]}' the model predicts '{shown}'"
    path = plot_attention_maps(maps, args.out, tokens=tokens, max_heads=args.max_heads, title=title)
    print(f"wrote {path}: {len(maps)} layers ({', '.join(m['kind'] for m in maps)})")
    return 0
