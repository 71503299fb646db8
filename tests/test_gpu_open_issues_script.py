"""scripts/gpu-open-issues.sh, the device calls issues 22 and 23 wait on, and
scripts/profile_parallax.py, one of its steps.

The shell script runs here with PY a stand-in that records each command, so what a device
call would run is read back without a GPU: every script it names exists, every constant it
sets exists with a value of its type, and the property suite keeps its warm-up. A typo found
here costs no device time.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import repo_scripts

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-open-issues.sh"

needs_shell = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout") and shutil.which("tar")),
                                 reason="needs bash, tar and coreutils' timeout")


def _run(tmp_path, part: str, **env_extra):
    py, log = repo_scripts.recording_python(tmp_path)
    env = dict(os.environ, PY=str(py), OUT=str(tmp_path / "out"), **env_extra)
    res = subprocess.run(["bash", str(SCRIPT), part], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return res, repo_scripts.recorded_calls(log)


@needs_shell
def test_the_tests_call_keeps_the_warmup_and_runs_both_parallax_kernels(tmp_path):
    res, calls = _run(tmp_path, "tests")
    assert res.returncode == 0, res.stdout + res.stderr
    suites = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert len(suites) == 3, calls
    assert not any("--lla-no-warmup" in c for c in suites)
    assert all(c[c.index("--hypothesis-profile") + 1] == "gpu" for c in suites)
    impls = [c[c.index("--lla-parallax-impl") + 1] for c in suites if "--lla-parallax-impl" in c]
    assert impls == ["parallax-triton", "parallax-triton-bf16w"]
    for c in suites:
        for arg in c:
            if arg.startswith(("tests/", "properties/")):
                assert (REPO / arg).is_file(), arg
    assert (tmp_path / "out" / "tests.tgz").is_file()


@needs_shell
def test_the_timings_call_names_what_exists(tmp_path):
    res, _ = _run(tmp_path, "timings", OLD=str(tmp_path / "nosuch"))
    assert res.returncode == 2 and "is not a directory" in res.stdout, res.stdout + res.stderr

    old = tmp_path / "old"
    old.mkdir()
    res, calls = _run(tmp_path, "timings", OLD=str(old))
    assert res.returncode == 0, res.stdout + res.stderr
    scripts = [c for c in calls if c and c[0].startswith("scripts/")]
    assert {c[0] for c in scripts} == {"scripts/ab_parallax.py", "scripts/profile_parallax.py",
                                       "scripts/profile_decode_kernels.py"}
    for c in scripts:
        assert (REPO / c[0]).is_file(), c[0]
    kernels = importlib.import_module("parallax_triton.kernels")
    for c in scripts:
        if "--set" in c:
            name, _, value = c[c.index("--set") + 1].partition("=")
            assert type(getattr(kernels, name)) is type(ast.literal_eval(value)), name
    prof = repo_scripts.load("profile_decode_kernels")
    variants = [c[i + 1] for c in scripts for i, a in enumerate(c) if a == "--variant"]
    assert variants
    for spec in variants:
        for mod, attr, value in prof.parse_variant(spec)[1]:
            assert type(getattr(importlib.import_module(mod), attr)) is type(value), (spec, attr)
    assert any(c[:3] == ["-m", "lla_verify", "bench-decode"] and "--graphs" in c for c in calls), calls


@needs_shell
def test_an_unknown_part_is_named(tmp_path):
    res, calls = _run(tmp_path, "nosuch")
    assert res.returncode == 2 and "unknown part nosuch" in res.stdout and not calls[1:], res.stdout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="--smoke runs the kernels through the "
                    "Triton interpreter (TRITON_INTERPRET=1)")
def test_profile_parallax_smoke_writes_its_table(tmp_path, monkeypatch):
    # run as a script, its folder is on sys.path, and it imports profile_decode_kernels from there
    monkeypatch.syspath_prepend(str(repo_scripts.SCRIPTS))
    out = tmp_path / "prof.md"
    repo_scripts.load("profile_parallax").main(["--smoke", "--step", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines[0].startswith("SMOKE RUN")
    assert {"parallax fwd", "sdpa fwd", "parallax fwd+bwd"} == {
        line.split("|")[1].strip() for line in lines if "**call (do_bench)**" in line}
