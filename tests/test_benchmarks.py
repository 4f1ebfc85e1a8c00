"""The benchmark scripts' command lines: each parses its arguments with argparse, so ``--help`` prints its
usage instead of being taken for an argument and starting minutes of work (a run folder named ``--help``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_each_benchmark_parses_its_command_line(script):
    tree = ast.parse(script.read_text())
    calls = {
        n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    picks_argv = any(  # sys.argv[i]: an argument taken past the parser
        isinstance(n, ast.Subscript) and isinstance(n.value, ast.Attribute) and n.value.attr == "argv"
        for n in ast.walk(tree)
    )
    assert "parse_args" in calls, (
        f"{script.name} has no argparse parser: --help would be taken as an argument"
    )
    assert not picks_argv, f"{script.name} takes arguments from sys.argv itself, beside its parser"


def test_the_list_is_not_empty():
    assert len(BENCHMARKS) >= 10
