"""Measurement utilities shared by every benchmark and the demo: time, peak memory, matmul throughput, and the
PASS/MISS table each benchmark prints.

The machines these run on are shared and noisy, so times are medians over repeats, and throughput targets are
stated as ratios against a matmul measured in the same run (``matmul_flops_per_second``) rather than as absolute
numbers.

Device handling: ``device=None`` means "the accelerator when one is present, else the CPU". On CUDA, time is taken
after ``torch.cuda.synchronize`` and memory from the caching allocator's peak counter; on the CPU, memory comes
from the torch profiler's allocation events (``profile_memory=True``), replayed in time order so that the reported
value is the true peak of live bytes, not the sum of every allocation.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from hybridattn.ops._checks import check_positive_int
from hybridattn._tables import _console, print_table  # noqa: F401 (re-exported: the benchmarks print with them)

__all__ = [
    "TargetRow",
    "default_device",
    "format_bytes",
    "format_seconds",
    "interleaved_medians",
    "matmul_flops_per_second",
    "median_time",
    "peak_memory",
    "print_table",
    "print_targets",
]


def default_device(device=None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, device=None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    Args:
        fn: a callable without arguments; its result is discarded.
        repeats: timed calls (> 0).
        warmup: untimed calls first (>= 0), to exclude one-off costs such as compilation or allocator growth.
        device: the device whose queued work must finish before the clock stops (see module docstring).

    Returns:
        The median time in seconds.

    Raises:
        TypeError / ValueError: ``fn`` is not callable, or ``repeats`` / ``warmup`` are not valid counts.
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, received {type(fn).__name__}")
    check_positive_int("repeats", repeats)
    check_positive_int("warmup", warmup, allow_zero=True)
    dev = default_device(device)
    for _ in range(warmup):
        fn()
    _synchronize(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, *, rounds: int = 25, warmup: int = 1, device=None) -> dict:
    """Median seconds of each callable in ``fns`` (a dict ``key -> fn``), timed one call at a time in alternation
    (``rounds`` rounds), so that the machine's noise falls on every entry alike; returns ``key -> seconds``."""
    check_positive_int("rounds", rounds)
    samples = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            samples[key].append(median_time(fn, repeats=1, warmup=warmup, device=device))
    return {key: statistics.median(times) for key, times in samples.items()}


@contextlib.contextmanager
def _without_profiler_chatter():
    """Some torch builds print ``USDT: ... profiler_start/stop`` lines to fd 2 on every profile; drop those and
    pass anything else written meanwhile through to stderr."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(True) if not ln.startswith("USDT:")]
            if kept:
                sys.stderr.write("".join(kept))


def _cpu_peak_from_profiler(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The kineto result keeps one "[memory]" record per allocation (+bytes) and free (-bytes) with its timestamp;
    # the public FunctionEvent list folds them into the enclosing op, which would hide temporaries freed inside it.
    records = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    records.sort(key=lambda e: e.start_ns())
    # Frees of tensors allocated before fn push the running sum below zero; the baseline is the live memory at
    # entry, so the peak above it is the running maximum, never negative.
    return max(0, max(itertools.accumulate(e.nbytes() for e in records), default=0))


def peak_memory(fn: Callable[[], object], *, device=None) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was live when it started.

    Args:
        fn: a callable without arguments. Whatever it returns is kept alive until it returns, so return nothing
            (or the output you want counted).
        device: which memory to measure; ``None`` picks CUDA when available, else the CPU.

    Returns:
        Peak live bytes allocated during ``fn`` minus the bytes live at entry (>= 0).

    Raises:
        TypeError: ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, received {type(fn).__name__}")
    dev = default_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - base)
    return _cpu_peak_from_profiler(fn)


def matmul_flops_per_second(dtype: torch.dtype = torch.float32, device=None, *, n: int = 1024,
                            repeats: int = 5) -> float:
    """Throughput of a square ``n x n`` matmul in this run, in floating-point operations per second.

    Benchmarks divide their own achieved FLOP/s by this number so that targets hold across machines and noise.

    Args:
        dtype: matmul dtype.
        device: where to run (``None``: CUDA when available, else the CPU).
        n: matrix side (> 0).
        repeats: timed repeats; the median is used.

    Returns:
        ``2 n^3 / median_time`` in FLOP/s.
    """
    check_positive_int("n", n)
    dev = default_device(device)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    seconds = median_time(lambda: a @ b, repeats=repeats, warmup=1, device=dev)
    return 2.0 * n**3 / seconds


def format_bytes(n: float) -> str:
    """Human-readable bytes with binary units (``64.0 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_seconds(t: float) -> str:
    """Milliseconds below ten seconds, seconds above (``950 ms``, ``42.6 s``)."""
    return f"{t * 1e3:,.0f} ms" if t < 10 else f"{t:,.1f} s"


@dataclass
class TargetRow:
    """One benchmark target: ``ratio`` is what was measured, ``threshold`` the bound it must meet.

    ``higher_is_better=True`` means PASS when ``ratio >= threshold`` (speed-up style), else when
    ``ratio <= threshold`` (memory fraction style).
    """

    name: str
    target: str
    measured: str
    ratio: float
    threshold: float
    higher_is_better: bool = True

    @property
    def passed(self) -> bool:
        return self.ratio >= self.threshold if self.higher_is_better else self.ratio <= self.threshold


def print_targets(title: str, rows: Sequence[TargetRow], *, console=None) -> bool:
    """Print target / measured / ratio / PASS-MISS rows and return whether every target passed."""
    cells = [
        (r.name, r.target, r.measured, f"{r.ratio:.3g}", "[green]PASS[/green]" if r.passed else "[red]MISS[/red]")
        for r in rows
    ]
    print_table(title, ("target", "goal", "measured", "ratio", "result"), cells, console=console)
    return all(r.passed for r in rows)
