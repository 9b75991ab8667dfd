"""The suite's own bookkeeping: the `slow` list in conftest.py names tests that exist."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import SLOW_TESTS

HERE = Path(__file__).parent


def test_every_slow_entry_names_a_test():
    for entry in SLOW_TESTS:
        file, _, test = entry.partition("::")
        assert (HERE / file).is_file(), entry
        if test:
            tree = ast.parse((HERE / file).read_text())
            names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
            assert test.split("[")[0] in names, f"{entry} in SLOW_TESTS names no test"
