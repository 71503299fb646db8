"""Comments and docstrings say why, never when: a date in one is a run log in the code.

Run logs belong in commit messages and docs/runs/. This scans every tracked *.py file's
comments (tokenize) and docstrings (ast) for calendar dates: ISO (YYYY-MM-DD, or
YYYY-MM), or a month name with a day and year (as "Month D, YYYY" or "D Mon YYYY").
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?"
DATE = re.compile(
    r"\b(?:19|20)\d\d-(?:0[1-9]|1[0-2])(?:-(?:0[1-9]|[12]\d|3[01]))?\b"
    rf"|\b{_MONTH} \d{{1,2}},? (?:19|20)\d\d\b"
    rf"|\b\d{{1,2}} {_MONTH} (?:19|20)\d\d\b"
)


def dated_lines(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment or docstring in ``source`` that holds a date."""
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and DATE.search(tok.string):
            hits.append((tok.start[0], tok.string.strip()))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and DATE.search(doc):
                hits.append((node.body[0].lineno, DATE.search(doc).group(0)))
    return hits


def _tracked_py() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
        return [ROOT / p for p in out.stdout.split()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): every file
        return [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "build" not in p.parts]


@pytest.mark.parametrize("source, n", [
    ("x = 1  # tuned on the H200, 2026-12-01\n", 1),
    ('def f():\n    """Measured 3 Dec 2026 on CPU."""\n', 1),
    ('"""Found December 2, 2026."""\n', 1),
    ("# why: kappa 1e6 rows need 13.5 D iterations\nx = '2026-12-01'  # a string, not prose\n", 0),
    ("# 2026-13-40 is no date, nor is version 2026-1\n", 0),
])
def test_the_scan_finds_dates_and_only_dates(source, n):
    assert len(dated_lines(source)) == n


def test_no_dates_in_comments_or_docstrings():
    found = []
    for path in _tracked_py():
        if not path.is_file():
            continue
        for line, text in dated_lines(path.read_text(encoding="utf-8")):
            found.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not found, ("dates in comments or docstrings (a run log belongs in the commit message or "
                       "docs/runs/):\n" + "\n".join(found))
