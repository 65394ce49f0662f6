"""``filtersurgery`` command line: ``inspect``, ``zoo``, ``run``, ``demo``, ``sweep-sharing`` (docs/).

Each sub-command lives in the module that implements it; that module exposes
``add_parsers(subparsers)`` which registers its commands with ``set_defaults(func=...)``.
A command function takes the parsed ``argparse.Namespace`` and returns an exit code.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from typing import Iterator, List, Optional

# modules that register sub-commands, in the order they appear in --help
COMMAND_MODULES = ["filtersurgery.cli.zoo", "filtersurgery.cli.run", "filtersurgery.cli.sweep"]


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The ``filtersurgery`` parser with every sub-command of ``COMMAND_MODULES`` registered."""
    parser = argparse.ArgumentParser(
        prog="filtersurgery",
        description="Model surgery for CNNs: trace scaling factors, sparsify, re-initialize, distil.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        importlib.import_module(mod_name).add_parsers(sub)
    return parser


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Show warnings as ``filtersurgery COMMAND: warning: MESSAGE`` (one line, no source line)."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        print(f"filtersurgery {command}: warning: {text}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``filtersurgery`` command; returns the exit code (2: one-line error, 130: Ctrl-C)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    with one_line_warnings(argv[0] if argv and not argv[0].startswith("-") else "(parse)"):
        args = parser.parse_args(argv)  # deprecated flag names warn here, one line each
    try:
        with one_line_warnings(args.command):
            return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        # bad input and known failures: one line, no traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"filtersurgery {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # commands with state to resume (run) say where it is themselves
        print(f"filtersurgery {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
