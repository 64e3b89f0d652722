"""Terminal tables shared by the commands and benchmarks (rich), readable at any width."""

from __future__ import annotations

from typing import Sequence


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], *, console=None) -> None:
    """Print a rich table; cells are converted with ``str``. A table wider than the console (an 80-column
    terminal, or output piped to a file) is printed as one record per row instead, every cell whole."""
    from rich.measure import Measurement
    from rich.table import Table

    console = _console(console)
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"rows: expected {len(columns)} cells per row, received {len(row)}")
        table.add_row(*(str(c) for c in row))
    if Measurement.get(console, console.options.update(max_width=10**6), table).maximum <= console.width:
        console.print(table)
        return
    console.print(f"[bold]{title}[/bold]")
    for row in rows:
        console.print(f"  {row[0]}")
        for col, cell in zip(columns[1:], row[1:]):
            console.print(f"      {col}: {cell}")


def _console(console):
    """``console``, or a new rich Console (the tests substitute this to fix the width)."""
    if console is not None:
        return console
    from rich.console import Console

    return Console()
