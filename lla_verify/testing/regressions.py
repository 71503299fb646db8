"""The stored regressions (properties/regressions.json): cases found once and checked forever.

Each entry is ``{"spec", "note", "date"}``, with ``"backward": true`` for a gradient
finding and ``"op"`` naming its operator (registry/operators.py) when that is not LLA;
an entry without ``"op"`` is an LLA case. ``lla-verify hunt --add-regression`` appends
to it; the property files read the entries of their operator through ``pinned``.
"""

from __future__ import annotations

import json
from pathlib import Path

from lla_verify.testing.location import suite_dir

PATH = suite_dir() / "regressions.json"


def entry_op(entry: dict) -> str:
    return entry.get("op", "lla")


def entries(path: Path = PATH) -> list[dict]:
    return json.loads(Path(path).read_text()) if Path(path).exists() else []


def pinned(op: str = "lla", *, backward: bool | None = None, path: Path = PATH) -> list:
    """The stored cases of operator ``op``, parsed by its parse_case; with ``backward``
    True only the gradient findings."""
    from lla_verify.registry.operators import get_operator

    parse = get_operator(op).parse_case
    return [parse(d["spec"]) for d in entries(path)
            if entry_op(d) == op and (backward is None or bool(d.get("backward")) == backward)]
