"""``hybridattn build-kernels``: compile every CPU kernel now (each builds on first use otherwise)."""

from __future__ import annotations

import argparse

HELP = "build the compiled CPU kernels now, reporting each (otherwise each builds on its first use, ~10-20 s)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from hybridattn.ops import _native

    results = _native.build_all()
    if not any(results.values()):
        print("no kernel built: HYBRIDATTN_NATIVE=0, or no C++ compiler; the PyTorch forms run everywhere")
    return 0
