"""Layer 7, the command line: ``filtersurgery run | demo | inspect | zoo | sweep-sharing``.

``main`` (parser and dispatch), ``run`` (run/demo commands), ``console`` (banner, estimate,
resume lines), ``zoo`` (inspect/zoo commands). ``filtersurgery.cli.main`` is the entry point.
"""
from .main import COMMAND_MODULES, UsageError, build_parser, main, one_line_warnings
