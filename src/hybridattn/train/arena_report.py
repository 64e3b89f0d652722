"""The arena's ``report.html``: one self-contained page (PNGs embedded as base64, no external files)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from hybridattn.bench.measure import format_bytes
from hybridattn.models.checkpoint import write_text_atomic

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; } td.num { text-align: right; } .pass { color: #080; } .miss { color: #b00; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; } code, pre { background: #f6f6f6; }
"""


def _table(results: dict) -> str:
    head = ["task", "model", "d", "L:S", "params", "accuracy mean ± sd", "seed min..max", "loss / bpb",
            "train tok/s", "decode ms (contexts)", "cache @ eval", "peak mem"]
    rows = []
    for r in results["summary"]:
        loss = f"{r['bits_per_byte']:.3f} bpb" if "bits_per_byte" in r else f"{r['loss_mean']:.3f}"
        decode = ", ".join(f"{c}: {s * 1e3:.2f}" for c, s in zip(r["contexts"], r["decode_s"]))
        cache = "-" if r["cache_bytes_eval"] is None else format_bytes(r["cache_bytes_eval"])
        cells = [r["task"], r["model"], r["width"], r["ratio"], f"{r['params']:,}",
                 f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} (n={r['seeds']})",
                 f"{r['accuracy_min']:.3f}..{r['accuracy_max']:.3f}", loss, f"{r['tokens_per_s']:,.0f}", decode,
                 cache, format_bytes(r["peak_memory_bytes"])]
        rows.append("<tr>" + "".join(
            f"<td{' class=num' if i > 1 else ''}>{html.escape(str(c))}</td>" for i, c in enumerate(cells)) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def _thesis(results: dict) -> str:
    from hybridattn.train.arena import thesis_mark

    rows = results.get("thesis")
    if not rows:
        return ""
    items = "".join(
        f"<li>d={r['width']}: {html.escape(r['name'])} = {r['measured']:.3f} (goal {html.escape(r['goal'])}) "
        f"<b class={'pass' if r['passed'] else 'miss'}>{thesis_mark(r)}</b></li>" for r in rows)
    return f"<h2>Thesis check (means over seeds)</h2><ul>{items}</ul>"


def write_report(results: dict, pngs: list[Path], path, *, command: str | None = None) -> Path:
    """Write ``report.html`` with the summary table, the thesis check, every PNG inline and the config."""
    cfg = results["config"]
    env = results["environment"]
    images = "".join(
        f"<h3>{html.escape(p.stem.replace('_', ' '))}</h3>"
        f"<img alt='{html.escape(p.name)}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        for p in pngs)
    notes = f"<h2>Why these settings</h2><p>{html.escape(cfg['notes'])}</p>" if cfg.get("notes") else ""
    cmd = f"<p>Command: <code>{html.escape(command)}</code></p>" if command else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>hybridattn arena: {html.escape(cfg['name'])}</title>
<style>{_STYLE}</style></head><body>
<h1>hybridattn arena: {html.escape(cfg['name'])}</h1>
<p>Every model is trained with the same budget ({cfg['train'].get('steps', '?')} steps of
{cfg['train'].get('batch_size', '?')} sequences) on the same tasks and evaluated on the same held-out examples;
accuracy is over scored positions only. Softmax attention recalls exact tokens at a cost that grows with the
context; linear attention keeps a fixed-size state and forgets; a hybrid with a few softmax layers keeps the
recall at nearly the linear cost.</p>
{notes}{cmd}<p>torch {html.escape(env['torch'])}, {env['threads']} threads, device {html.escape(env['device'])},
sweep wall time {env['wall_seconds']:.0f} s.</p>
<h2>Results</h2>{_table(results)}{_thesis(results)}<h2>Plots</h2>{images}
<h2>Configuration</h2><pre>{html.escape(json.dumps(cfg, indent=1))}</pre></body></html>"""
    path = Path(path)
    write_text_atomic(path, page)
    return path
