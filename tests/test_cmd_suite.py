"""lla-verify suite: the front's own usage errors, and pytest's exit status passed on
(its usage error as 2). pytest itself is replaced here; tests/test_wheel.py runs it."""

from __future__ import annotations

import subprocess

import pytest

from lla_verify import cli

from lla_verify.commands import suite as cmd_suite


@pytest.fixture
def pytest_exits(monkeypatch):
    """Stand in for the pytest subprocess: exits with the status set in ``box[0]``;
    the commands it was given collect in ``box[1:]``."""
    box = [0]
    monkeypatch.setattr(cmd_suite, "_suite_args", lambda: ["--pyargs", cmd_suite.SUITE_PACKAGE])

    def fake_run(cmd, *a, **kw):
        box.append(cmd)
        return subprocess.CompletedProcess(cmd, box[0])

    monkeypatch.setattr(cmd_suite.subprocess, "run", fake_run)
    return box


@pytest.mark.parametrize("pytest_rc, ours", [(0, 0), (1, 1), (2, 2), (3, 3), (4, 2), (5, 5)])
def test_exit_status_is_pytests_with_its_usage_error_as_2(pytest_exits, pytest_rc, ours):
    pytest_exits[0] = pytest_rc
    assert cli.main(["suite", "--impl", "torch-fp32"]) == ours


def test_pytest_arguments_after_the_separator_pass_through(pytest_exits):
    assert cli.main(["suite", "--impl", "torch-fp32", "--device", "cpu", "--", "-n", "2", "-k", "forward"]) == 0
    cmd = pytest_exits[1]
    assert cmd[1:3] == ["-m", "pytest"] and cmd[-4:] == ["-n", "2", "-k", "forward"]
    assert cmd[cmd.index("--lla-impl") + 1] == "torch-fp32" and cmd[cmd.index("--lla-device") + 1] == "cpu"
    assert cmd[cmd.index("--pyargs") + 1] == "lla_verify_properties"


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_xyz:fn", ["--impl", "no_such_module_xyz"]),
    ("lla_verify.registry.impls:no_such_fn", ["--impl", "no_such_fn"]),
    ("not-a-builtin", ["--impl", "not-a-builtin"]),
])
def test_bad_impl_is_one_line_and_exit_2_before_pytest_runs(pytest_exits, capsys, spec, words):
    assert cli.main(["suite", "--impl", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert len(pytest_exits) == 1  # pytest never started


def test_missing_suite_package_is_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(cmd_suite, "_suite_args", lambda: None)
    assert cli.main(["suite", "--impl", "torch-fp32"]) == 2
    assert cmd_suite.SUITE_PACKAGE in capsys.readouterr().err


def test_impl_is_required():
    with pytest.raises(SystemExit) as exc:
        cli.main(["suite"])
    assert exc.value.code == 2


def test_parallax_impl_passes_through_and_a_bad_one_is_exit_2(pytest_exits, capsys):
    assert cli.main(["suite", "--impl", "torch-fp32", "--parallax-impl", "parallax-oracle"]) == 0
    cmd = pytest_exits[1]
    assert cmd[cmd.index("--lla-parallax-impl") + 1] == "parallax-oracle"
    assert cli.main(["suite", "--impl", "torch-fp32", "--parallax-impl", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--parallax-impl" in err and "nope" in err, err
    assert len(pytest_exits) == 2  # the second run never started pytest


@pytest.mark.parametrize("opt, plugin_opt, good", [
    ("--decode-impl", "--lla-decode-impl", "lla-decode-oracle"),
    ("--parallax-decode-impl", "--lla-parallax-decode-impl", "lla_verify.testing.mutants:pxdec_split_control"),
])
def test_decode_impls_pass_through_and_a_bad_one_is_exit_2(pytest_exits, capsys, opt, plugin_opt, good):
    assert cli.main(["suite", "--impl", "torch-fp32", opt, good]) == 0
    cmd = pytest_exits[1]
    assert cmd[cmd.index(plugin_opt) + 1] == good
    # another operator's built-in is refused by name
    wrong = "lla-decode-oracle" if "parallax" in opt else "parallax-decode-oracle"
    for bad in ("nope", "no_such_module_xyz:fn", wrong):
        assert cli.main(["suite", "--impl", "torch-fp32", opt, bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and opt in err and plugin_opt not in err, err
    assert len(pytest_exits) == 2  # no bad run started pytest
