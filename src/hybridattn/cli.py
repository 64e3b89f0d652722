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
    "build-kernels": "hybridattn.commands.build_kernels",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridattn",
        description="Attention mechanisms and hybrid (linear + softmax) transformers: run, compare, measure.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    add_subcommands(parser.add_subparsers(dest="command", metavar="COMMAND"), COMMANDS, run_key="_run")
    return parser


def add_subcommands(subparsers, table: dict[str, str], *, run_key: str) -> None:
    """One parser per ``name -> module`` in ``table``; each module provides ``HELP``, ``add_arguments(parser)``
    and ``run(args)``, stored in ``args.<run_key>``. Modules that do not exist (yet) are left out."""
    for name, module_name in table.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        p = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(**{run_key: module.run})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as err:
        if args.debug:
            raise
        # the library's errors name the argument, expected and received: that line is the message
        print(f"hybridattn {args.command}: error: {err}\n(hybridattn --debug {args.command} ... shows the "
              f"traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
