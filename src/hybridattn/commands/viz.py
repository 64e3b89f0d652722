"""``hybridattn viz <what>``: pictures of models and masks.

Each sub-subcommand lives in a module of ``hybridattn.viz`` that provides ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``, like the top-level commands; adding one is one line in ``VIEWS``.
"""

from __future__ import annotations

import argparse

from hybridattn.cli import add_subcommands

HELP = "draw attention matrices of a trained model (attention), attention masks (masks) or memory capacity (capacity)"

VIEWS = {
    "attention": "hybridattn.viz.attention_maps",
    "masks": "hybridattn.viz.masks",
    "capacity": "hybridattn.viz.capacity",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_subcommands(parser.add_subparsers(dest="view", metavar="VIEW"), VIEWS, run_key="_view_run")
    parser.set_defaults(_viz_parser=parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_view_run", None) is None:
        args._viz_parser.print_help()
        return 0
    return int(args._view_run(args) or 0)
