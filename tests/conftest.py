"""Helpers shared by the test files (import them with ``from conftest import ...``; fixtures by name).

The tests mirror the package: ``tests/<layer>/`` holds the tests of ``filtersurgery/<layer>/``;
``tests/e2e/`` the end-to-end runs (all marked ``slow``); ``tests/test_architecture.py`` and
``tests/test_examples.py`` check the whole package, its docs and examples."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test under ``tests/e2e/`` (end-to-end: real training runs, subprocesses) is ``slow``."""
    for item in items:
        if "e2e" in item.path.relative_to(ROOT / "tests").parts[:1]:
            item.add_marker(pytest.mark.slow)


def tiny_run_args(out, *extra, epochs: str = "1") -> List[str]:
    """``filtersurgery run`` arguments of a seconds-long run: cifar:resnet20 on 8 demo images per part,
    batch 4, one batch per epoch, on the CPU, into ``out``; ``extra`` flags are appended."""
    return ["run", "--model", "cifar:resnet20", "--data", "demo", "--epochs", epochs, "--subset", "8", "--batch-size",
            "4", "--max-batches", "1", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def run_cli(argv, capsys) -> Tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``filtersurgery ARGV`` in this process (argparse errors exit via
    SystemExit, whose code is returned)."""
    from filtersurgery.cli.main import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    o = capsys.readouterr()
    return rc, o.out, o.err


def subcommands() -> dict:
    """``{name: ArgumentParser}`` of every ``filtersurgery`` sub-command."""
    from filtersurgery.cli.main import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests: tiny convs gain nothing from threads, and on a busy
    2-core host two threads spin-wait and run far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
