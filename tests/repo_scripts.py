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


def recording_python(folder: Path) -> tuple[Path, Path]:
    """A stand-in for python (a shell script's PY) that appends each command line it is
    given, shell-quoted, to a log and prints a pytest summary line: what a GPU script would
    run, read back without a GPU. Returns (the stand-in, its log)."""
    import shlex
    import stat

    log = folder / "calls.log"
    py = folder / "py"
    py.write_text("#!/usr/bin/env bash\n"
                  f'printf "%s\\n" "$(printf "%q " "$@")" >> {shlex.quote(str(log))}\n'
                  'echo "3 passed in 0.01s"\n')
    py.chmod(py.stat().st_mode | stat.S_IXUSR)
    return py, log


def recorded_calls(log: Path) -> list[list[str]]:
    """The command lines a recording_python logged, split as the shell would."""
    import shlex

    return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []
