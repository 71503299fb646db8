"""No property passes a draw it did not judge.

Inside a Hypothesis test a bare ``return`` before any assertion makes the draw count as a
pass that compared nothing; a property whose every draw takes it passes having asserted
nothing (docs/kill-list.md names those the suite had). A draw outside what a property can judge is set
aside with ``suite.not_this_property`` (Hypothesis rejects it, and a property that can
judge none fails as Unsatisfiable). A ``return`` after the draw's first assertion (a second
leg skipped, its reason recorded with ``event``) is allowed: the draw was judged.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROPERTIES = sorted((Path(__file__).resolve().parents[1] / "properties").glob("test_*.py"))


def _is_given(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        call = d.func if isinstance(d, ast.Call) else d
        if (isinstance(call, ast.Name) and call.id == "given") or (isinstance(call, ast.Attribute) and call.attr == "given"):
            return True
    return False


def _own_nodes(fn: ast.FunctionDef):
    """The nodes of ``fn``'s body, not of functions defined inside it."""
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _asserts(node) -> bool:
    if isinstance(node, ast.Assert):
        return True
    if isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        return name.startswith("assert")
    return False


def unjudged_returns(source: str) -> list[int]:
    """Line numbers of bare returns, in @given functions, that no assertion precedes."""
    bad = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef) or not _is_given(fn):
            continue
        nodes = list(_own_nodes(fn))
        first_assert = min((n.lineno for n in nodes if _asserts(n)), default=None)
        for n in nodes:
            if isinstance(n, ast.Return) and n.value is None and (first_assert is None or n.lineno < first_assert):
                bad.append(n.lineno)
    return sorted(bad)


@pytest.mark.parametrize("path", PROPERTIES, ids=lambda p: p.name)
def test_no_property_returns_before_it_has_judged(path):
    bad = unjudged_returns(path.read_text())
    assert not bad, (f"{path.name}: a bare return before any assertion in a Hypothesis test, lines {bad}: the draw "
                     "passes having compared nothing; use suite.not_this_property(reason)")


def test_the_rule_sees_an_early_return_and_allows_a_late_one():
    early = ("from hypothesis import given\n@given(x=1)\ndef prop(x):\n    if x:\n        return\n"
             "    assert x == 0\n")
    late = ("from hypothesis import given\n@given(x=1)\ndef prop(x):\n    assert_within_budget(x)\n"
            "    if x:\n        return\n")
    assert unjudged_returns(early) == [5]
    assert unjudged_returns(late) == []
