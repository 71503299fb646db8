"""scripts/gpu-seeds.sh runs the property suite once per seed: the first seed of a call with
the suite's kernel warm-up, the later ones without it (the first left Triton's cache warm),
on the part of the suite TESTS names.

The script runs here with PY a stand-in that records each command and prints a pytest
summary line, so what it would run on the GPU is read back without a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import repo_scripts

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-seeds.sh"

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                reason="needs bash and coreutils' timeout")


def _run(tmp_path, **env_extra) -> tuple[list[list[str]], str]:
    py, log = repo_scripts.recording_python(tmp_path)
    env = dict(os.environ, PY=str(py), OUT=str(tmp_path / "out"), SEEDS="3 4 5", **env_extra)
    res = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return repo_scripts.recorded_calls(log), (tmp_path / "out" / "seeds.txt").read_text()


def _seed(cmd) -> str:
    return next(a.split("=", 1)[1] for a in cmd if a.startswith("--hypothesis-seed="))


def test_only_the_first_seed_warms_up(tmp_path):
    calls, summary = _run(tmp_path)
    assert [_seed(c) for c in calls] == ["3", "4", "5"]
    assert ["--lla-no-warmup" in c for c in calls] == [False, True, True]
    assert all(c[-1] == "properties" for c in calls)
    assert summary.count("3 passed") == 3, summary


def test_warm_each_and_tests(tmp_path):
    calls, _ = _run(tmp_path, WARM_EACH="1", TESTS="properties/test_gradients.py properties/test_decode.py")
    assert not any("--lla-no-warmup" in c for c in calls)
    assert all(c[-2:] == ["properties/test_gradients.py", "properties/test_decode.py"] for c in calls)
