"""A kernel fault that loses the process's CUDA context is charged to the test or audit
cell that ran it, and the work after it in that process is reported as not run
(lla_verify/testing/cuda_context.py). No CPU can fault a CUDA context, so the fault is
planted: the context check's synchronisation raises what torch raises after an illegal
memory access, from a chosen point on."""

from __future__ import annotations

import textwrap

import pytest

from lla_verify.testing import cuda_context

pytest_plugins = ["pytester"]

FAULT = ("CUDA error: an illegal memory access was encountered\n"
         "CUDA kernel errors might be asynchronously reported at some other API call")


class AcceleratorError(RuntimeError):
    """Stands for torch.AcceleratorError, which torch raises for a sticky CUDA error."""


@pytest.fixture
def planted(monkeypatch):
    """A process whose CUDA context dies when ``state['dead']`` is set."""
    state = {"dead": False, "syncs": 0}

    def sync():
        state["syncs"] += 1
        if state["dead"]:
            raise AcceleratorError(FAULT)

    monkeypatch.setattr(cuda_context, "_synchronize", sync)
    monkeypatch.setattr(cuda_context, "_cuda_in_use", lambda: True)
    cuda_context._reset_for_tests()
    yield state
    cuda_context._reset_for_tests()


# ------------------------------------------------------------------ the helper
@pytest.mark.parametrize("msg, lost", [
    (FAULT, True),
    ("CUDA error: unspecified launch failure", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: misaligned address", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),  # the context survives
    ("illegal memory access", False),  # not a CUDA error
])
def test_describe(msg, lost):
    got = cuda_context.describe(AcceleratorError(msg))
    assert (got is not None) == lost
    if lost:
        assert got == f"AcceleratorError: {msg.splitlines()[0]}"


def test_describe_follows_the_cause():
    try:
        try:
            raise AcceleratorError(FAULT)
        except AcceleratorError as inner:
            raise ValueError("the check failed") from inner
    except ValueError as exc:
        assert "illegal memory access" in cuda_context.describe(exc)


def test_check_remembers_the_first_loss(planted):
    assert cuda_context.check("a") is None and cuda_context.lost_in() is None
    planted["dead"] = True
    assert "illegal memory access" in cuda_context.check("b")
    assert cuda_context.lost_in() == "b"
    n = planted["syncs"]
    assert cuda_context.check("c") is None  # lost before: no CUDA call, no new blame
    assert planted["syncs"] == n and cuda_context.lost_in() == "b"


def test_no_cuda_no_sync(monkeypatch):
    # a process that never initialised CUDA is not made to (here: no torch CUDA at all)
    monkeypatch.setattr(cuda_context, "_synchronize", lambda: pytest.fail("synchronised without CUDA"))
    cuda_context._reset_for_tests()
    assert cuda_context.probe() is None


# ------------------------------------------------------------------ the pytest plugin
_CONFTEST = f'''
from lla_verify.testing import cuda_context

STATE = {{"dead": False}}


class AcceleratorError(RuntimeError):
    pass


def _sync():
    if STATE["dead"]:
        raise AcceleratorError({FAULT!r})


cuda_context._synchronize = _sync
cuda_context._cuda_in_use = lambda: True
'''

_TESTS = '''
from conftest import STATE


def test_a():
    pass


def test_b_faults():
    STATE["dead"] = True  # the kernel's fault: asynchronous, the test itself sees nothing


def test_c():
    pass


def test_d():
    assert False, "must not run"
'''


def _run(pytester, *args):
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(test_faulting=_TESTS)
    return pytester.runpytest_subprocess("--lla-device", "cpu", "-p", "no:cacheprovider", "-p", "no:randomly",
                                         "-rA", *args)


def test_plugin_blames_the_faulting_test_and_runs_no_later_one(pytester):
    res = _run(pytester, "-p", "no:xdist")
    res.assert_outcomes(passed=2, errors=3)  # test_a, test_b's call; test_b's teardown, test_c, test_d
    out = res.stdout.str()
    assert "ERROR at teardown of test_b_faults" in out
    assert ("CUDA context lost during this test: AcceleratorError: CUDA error: an illegal memory access was "
            "encountered; the implementation faulted") in out
    for name in ("test_c", "test_d"):
        assert f"ERROR at setup of {name}" in out
    assert out.count("not run: the CUDA context of this process was lost in test_faulting.py::test_b_faults") >= 2
    assert "must not run" not in out
    assert "the CUDA context was lost in 1 test(s): test_faulting.py::test_b_faults; 2 later test(s)" in out
    assert res.ret != 0


def test_plugin_under_xdist_affects_the_faulting_worker_only(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_other="def test_x():\n    pass\n\ndef test_y():\n    pass\n")
    res = _run(pytester, "-n", "2", "--dist", "loadfile")
    res.assert_outcomes(passed=4, errors=3)  # test_other's two pass on the other worker
    out = res.stdout.str()
    assert "must not run" not in out
    assert "the CUDA context was lost in 1 test(s): test_faulting.py::test_b_faults; 2 later test(s)" in out
