"""The ``hybridattn`` command line.

Each subcommand lives in its own module under ``hybridattn.commands`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Adding a command is one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "hybridattn.commands.demo",
    "arena": "hybridattn.commands.arena",
    "viz": "hybridattn.commands.viz",
    "memory": "hybridattn.commands.memory",
    "generate": "hybridattn.commands.generate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridattn",
        description="Attention mechanisms and hybrid (linear + softmax) transformers: run, compare, measure.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # command not built yet
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
