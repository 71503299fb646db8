"""The repository's scripts/ files as modules, for the tests that call their functions
(scripts/ is not a package and is not in the wheel)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@functools.cache
def load(name: str):
    """scripts/NAME.py, imported once per process under the module name NAME."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
