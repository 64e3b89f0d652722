"""Run every benchmark in one go: ``python -m hybridattn.bench.run_all [NAME ...]``.

Each benchmark prints its own targets with the measured ratio and PASS/MISS; this runner only sequences
them (one at a time, so they do not compete for the cores) and prints a one-line summary per benchmark.
Peers that a benchmark compares against (transformers, fla) come from the ``bench`` extra; a benchmark
whose peer is missing says so and is reported as skipped.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

BENCHMARKS = {
    "softmax": "hybridattn.bench.softmax",
    "linear": "hybridattn.bench.linear",
    "linear_gla": "hybridattn.bench.linear_gla",
    "sparse": "hybridattn.bench.sparse",
    "models": "hybridattn.bench.models",
    "qwen3_next": "hybridattn.bench.qwen3_next",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridattn.bench.run_all", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run, of {list(BENCHMARKS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; expected names from {list(BENCHMARKS)}")
    summary = []
    for name in args.names or list(BENCHMARKS):
        print(f"\n=== {name} ({BENCHMARKS[name]}) ===", flush=True)
        start = time.perf_counter()
        try:
            result = importlib.import_module(BENCHMARKS[name]).main([])
            status = "ok" if result in (0, True, None) else "some targets missed"
        except ModuleNotFoundError as err:
            status = f"skipped (missing {err.name})"
        summary.append((name, status, time.perf_counter() - start))
    print("\n=== summary ===")
    for name, status, seconds in summary:
        print(f"{name:12s} {status:30s} {seconds:8.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
