"""scripts/gpu-flashlla.sh asks every tool about the LLA operator only, the one the public
FlashLLA provides, and its audit slices cover the plan they cut exactly.

The script runs here with PY a stand-in that records each command instead of running it
(the inline programs, ``PY -c``, run on the real interpreter: the import of a stand-in
flashlla package and the plan's size), so what it would run on the GPU is read back
without a GPU.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests import repo_scripts

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-flashlla.sh"
SLICES = 10

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                reason="needs bash and coreutils' timeout")


@pytest.fixture(scope="module")
def calls(tmp_path_factory) -> list[list[str]]:
    return _run_script(tmp_path_factory.mktemp("gpu-flashlla"))


def _run_script(tmp, **extra) -> list[list[str]]:
    (tmp / "fl" / "flashlla").mkdir(parents=True)
    (tmp / "fl" / "flashlla" / "__init__.py").write_text("__version__ = 'stand-in'\n")
    log = tmp / "calls.log"
    py = tmp / "py"
    py.write_text("#!/usr/bin/env bash\n"
                  f'if [ "$1" = -c ]; then exec {shlex.quote(sys.executable)} "$@"; fi\n'
                  f'printf "%s\\n" "$(printf "%q " "$@")" >> {shlex.quote(str(log))}\n')
    py.chmod(py.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PY=str(py), OUT=str(tmp / "out"), FLASHLLA_PATH=str(tmp / "fl"), SLICES=str(SLICES),
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]))
    env.pop("ONLY", None)  # every job
    env.pop("SUITE_TESTS", None)
    env.update(extra)
    res = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    status = (tmp / "out" / "status.txt").read_text()
    assert "does not import" not in status, status
    return [shlex.split(line) for line in log.read_text().splitlines()]


def _cmds(calls, *words):
    n = len(words)
    return [c for c in calls if any(tuple(c[i:i + n]) == words for i in range(len(c)))]


def _opt(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_audit_slices_are_of_lla_only_and_cover_its_plan(calls):
    from lla_verify.audit.plan import plan_op
    from lla_verify.commands.audit import parse_ops
    from lla_verify.registry.impls import get_impl

    slices = [c for c in _cmds(calls, "lla_verify", "audit") if "--merge" not in c]
    assert slices and len(slices) <= SLICES
    for c in slices:
        assert _opt(c, "--impl") == "flashlla"
        assert parse_ops(_opt(c, "--ops")) == ["lla"], f"an audit slice not limited to LLA: {c}"
    # the slices cut the plan that --ops lla gives, so they must cover it: no cell twice, none left
    n = len(plan_op("lla", get_impl("flashlla"), full=True)[0])
    bounds = sorted(tuple(int(x) for x in _opt(c, "--cells").split(":")) for c in slices)
    assert bounds[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), bounds
    assert bounds[-1][0] < n <= bounds[-1][1], (bounds, n)
    # the merge reads every slice's report (the stand-in writes none: its glob stays a pattern)
    (merge,) = _cmds(calls, "audit", "--merge")
    reports = merge[merge.index("--merge") + 1:merge.index("--out")]
    for c in slices:
        assert any(fnmatch.fnmatch(_opt(c, "--out") + "/report.json", r) for r in reports), (c, reports)


def test_suite_leaves_out_the_other_operators_property_files(calls):
    (suite,) = _cmds(calls, "-m", "pytest")
    assert _opt(suite, "--lla-impl") == "flashlla"
    ignored = {a.removeprefix("--ignore=") for a in suite if a.startswith("--ignore=")}
    # the files the suite check does not expect a result from are the ones the run leaves out
    assert {Path(p).name for p in ignored} == set(repo_scripts.load("flashlla_suite_check").NON_LLA_PROPERTY_FILES)
    for p in ignored:
        assert (REPO / p).is_file(), f"--ignore={p}: no such file (renamed? it would run again)"


def test_the_whole_suite_is_judged_as_a_whole(calls):
    (suite,) = _cmds(calls, "-m", "pytest")
    assert "properties" in suite
    (check,) = _cmds(calls, "scripts/flashlla_suite_check.py")
    assert "--part" not in check


def test_a_part_of_a_split_suite_runs_its_files_and_is_judged_as_a_part(tmp_path):
    files = "properties/test_gradients.py properties/test_limits.py"
    calls = _run_script(tmp_path, ONLY="suite", SUITE_TESTS=files)
    (suite,) = _cmds(calls, "-m", "pytest")
    assert set(files.split()) <= set(suite) and "properties" not in suite, suite
    (check,) = _cmds(calls, "scripts/flashlla_suite_check.py")
    assert "--part" in check, check
    assert not _cmds(calls, "lla_verify", "audit") and not _cmds(calls, "lla_verify", "hunt")


def test_hunt_and_goldens_are_of_lla(calls):
    (hunt,) = _cmds(calls, "lla_verify", "hunt")
    (goldens,) = _cmds(calls, "goldens", "compare")
    for c in (hunt, goldens):
        assert _opt(c, "--op") == "lla" and _opt(c, "--impl") == "flashlla", c
