"""Tables are readable at 80 columns and when piped: a table that does not fit becomes one record per row, every
name and number whole."""

import io

import torch
from rich.console import Console

from hybridattn._tables import print_table
from hybridattn.models.config import ModelConfig
from hybridattn.models.memory import plan, print_plan


def _render(fn, width):
    buf = io.StringIO()
    fn(Console(file=buf, width=width))
    return buf.getvalue().splitlines()


def test_a_wide_table_becomes_records_at_80_columns_and_stays_a_table_when_it_fits():
    columns = ("layer kind", "layers", "params", "KV cache", "recurrent state", "conv tail", "bookkeeping", "total")
    rows = [("gated_deltanet", 36, "59,347,139,328", "0 B", "72.00 MiB", "1.69 MiB", "288 B", "73.69 MiB")]
    narrow = _render(lambda c: print_table("plan", columns, rows, console=c), 80)
    assert max(map(len, narrow)) <= 80 and not any("…" in line for line in narrow)
    assert "      params: 59,347,139,328" in narrow and "  gated_deltanet" in narrow
    wide = _render(lambda c: print_table("plan", columns, rows, console=c), 200)
    assert any("59,347,139,328" in line and "73.69 MiB" in line for line in wide)  # one row of a table


def test_the_memory_plan_is_whole_at_80_columns():
    p = plan(ModelConfig.preset("qwen3-next-80b"), 262_144, 1, torch.bfloat16)
    lines = _render(lambda c: print_plan(p, title="qwen3-next-80b", console=c), 80)
    assert max(map(len, lines)) <= 80 and not any("…" in line for line in lines)
    assert "      params: 79,674,391,296" in lines and "      cache vs softmax-only: 0.253x" in lines
