"""Where the property suite lives: the installed package, else the source tree's folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# The import name of the property suite: setuptools maps it to the properties/ folder
# of the source tree (pyproject.toml, [tool.setuptools.package-dir]).
SUITE_PACKAGE = "lla_verify_properties"


def suite_dir() -> Path:
    """The suite's folder: the installed package, else properties/ of the source tree."""
    spec = importlib.util.find_spec(SUITE_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "properties"
