"""A kernel fault that loses the process's CUDA context is charged to the test or audit
cell that ran it, and the work after it in that process is reported as not run
(lla_verify/testing/cuda_context.py). No CPU can fault a CUDA context, so the fault is
planted: the context check's synchronisation raises what torch raises after an illegal
memory access, from a chosen point on."""

from __future__ import annotations

import math

import numpy as np
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
    # a process that never initialised CUDA is not made to; on a GPU machine this worker
    # has already initialised it, so the process is made to look as if it had not
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
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
    # the plugin named with -p: a source checkout on PYTHONPATH (the GPU image) has no pytest11 entry point
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(test_faulting=_TESTS)
    return pytester.runpytest_subprocess("-p", "lla_verify.testing.pytest_plugin", "--lla-device", "cpu", "-p", "no:cacheprovider", "-p", "no:randomly",
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


# ------------------------------------------------------------------ the audit, check and hunt
from lla_verify.audit import plan as audit_plan  # noqa: E402
from lla_verify.audit import run as audit_run  # noqa: E402
from lla_verify.oracles.dense import dense_torch_lla  # noqa: E402
from lla_verify.registry.cases import Case  # noqa: E402
from lla_verify.registry.impls import Impl  # noqa: E402

# Four well-conditioned cells (tests/test_audit.py's): an honest fp32 implementation passes
# each, so a failure is the planted fault's. The second (S = 24) is the one that faults.
CELLS = [audit_plan.Cell("test", c) for c in (
    Case("gaussian", {"lam": 1.0}, S=33, D=8),
    Case("gaussian", {"lam": 10.0}, S=24, D=8),
    Case("spectrum", {"kappa": 100.0, "rotate": 1}, S=20, D=8),
    Case("bandwidth", {"scale": 1e-2, "lam": 1.0}, S=17, D=8),
)]
FAULTS_AT = 24


def _plant_in_this_process():
    """The fault, planted in the process that runs the cell: from now on its context
    check raises as after an illegal memory access."""
    def sync():
        raise AcceleratorError(FAULT)

    cuda_context._cuda_in_use = lambda: True
    cuda_context._synchronize = sync


def faults_on_s24(q, k, v, *, ridge_lambda, qk_scale=None):
    """Correct, except that on S = 24 its kernel faults (asynchronously: the call returns)."""
    if q.shape[-2] == FAULTS_AT:
        _plant_in_this_process()
    return dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def _sticky_closure(calls):
    """faults_on_s24 as a closure (cannot be pickled: the cells run in this process) that
    raises at every call after the fault, as any CUDA call does on a lost context."""
    def fn(q, k, v, *, ridge_lambda, qk_scale=None):
        calls.append(q.shape[-2])
        if cuda_context.lost_in() is not None or calls.count(FAULTS_AT) > 1:
            raise AcceleratorError(FAULT)
        return faults_on_s24(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)
    return fn


@pytest.fixture
def clean_context(monkeypatch):
    """This process's context check restored after a test planted a fault in it."""
    monkeypatch.setattr(cuda_context, "_synchronize", cuda_context._synchronize)
    monkeypatch.setattr(cuda_context, "_cuda_in_use", cuda_context._cuda_in_use)
    cuda_context._reset_for_tests()
    yield
    cuda_context._reset_for_tests()


def test_audit_in_this_process_blames_the_cell_and_runs_no_later_one(clean_context, tmp_path):
    calls = []
    impl = Impl(name="faulty", forward=_sticky_closure(calls), description="faults on S = 24")
    res = audit_run.run_audit(impl, CELLS, out=str(tmp_path), backward=False)
    cells, v = res.report["cells"], res.report["verdict"]
    assert calls == [33, 24]  # nothing ran after the fault
    assert cells[0]["passed"] and not cells[0].get("cuda_context_lost")
    lost = cells[1]
    assert not lost["passed"] and lost["cause"] == "implementation" and lost["cuda_context_lost"]
    assert lost["message"].startswith("[faulty] CUDA context lost during this cell: AcceleratorError: CUDA error: "
                                      "an illegal memory access was encountered; the implementation faulted on "
                                      + CELLS[1].case.spec())
    for c in cells[2:]:
        assert not c["passed"] and c["cause"] == "not run" and c["not_run_after"] == CELLS[1].case.spec()
        assert c["message"] == f"[faulty] not run: the CUDA context of this process was lost in {CELLS[1].case.spec()}"
    assert res.exit_code == 1 and not v["passed"]
    assert v["n_failed"] == 3 and v["n_not_run"] == 2 and v["causes"] == {"implementation": 1, "not run": 2}
    assert v["worst_spec"] == CELLS[1].case.spec()  # the fault, not a cell without a verdict
    assert v["cuda_context_lost"] == [CELLS[1].case.spec()]
    lines = audit_run.summary_lines(res.report)
    assert f"INCOMPLETE: 2 cells not run: the CUDA context of their process was lost in {CELLS[1].case.spec()}" \
        in "\n".join(lines)
    assert any(line.startswith("CUDA context lost (the kernel faulted on the device) in 1 cells") for line in lines)
    html = (tmp_path / "report.html").read_text()
    assert "INCOMPLETE: 2 cells not run" in html and "CUDA context lost in 1 cells" in html
    # the written report reads back as a well-formed one (--baseline, --merge)
    from lla_verify.audit.baseline import read_report

    assert len(read_report(str(tmp_path / "report.json"), "--baseline")["cells"]) == 4


def test_audit_in_a_child_replaces_it_and_runs_the_later_cells(clean_context, tmp_path):
    impl = Impl(name="faulty", forward=faults_on_s24, description="faults on S = 24")
    res = audit_run.run_audit(impl, CELLS, backward=False, cell_timeout=120)
    cells, v = res.report["cells"], res.report["verdict"]
    assert cuda_context.lost_in() is None  # the fault was the child's
    assert [c["passed"] for c in cells] == [True, False, True, True]
    assert "CUDA context lost during this cell" in cells[1]["message"] and cells[1]["cause"] == "implementation"
    assert v["n_not_run"] == 0 and v["not_run"] is None and res.exit_code == 1
    assert not any(line.startswith("INCOMPLETE") for line in audit_run.summary_lines(res.report))


def test_a_fault_in_the_checks_own_cuda_work_is_the_cells(clean_context, monkeypatch):
    # the forward returned, then the verdict's own first CUDA call raised the sticky error
    from lla_verify.audit import cell as audit_cell

    def check_raises(*a, **k):
        _plant_in_this_process()
        raise AcceleratorError(FAULT)

    monkeypatch.setattr("lla_verify.budget.forward.check_forward", check_raises)
    impl = Impl(name="faulty", forward=dense_torch_lla, description="reference")
    rec = audit_cell.run_cell_isolated(None, CELLS[0], impl, "cpu", backward=False)
    assert rec["cuda_context_lost"] and "CUDA context lost during this cell" in rec["message"]
    monkeypatch.setattr("lla_verify.budget.forward.check_forward", lambda *a, **k: 1 / 0)
    cuda_context._reset_for_tests()  # any other error is not turned into a fault
    with pytest.raises(ZeroDivisionError):
        audit_cell.run_cell_isolated(None, CELLS[0], impl, "cpu", backward=False)


def test_hunt_in_this_process_stops_at_the_fault(clean_context):
    from lla_verify.commands import hunt

    calls = []
    impl = Impl(name="faulty", forward=_sticky_closure(calls), description="faults on S = 24")
    obj = hunt.Objective(impl, "cpu", S=FAULTS_AT, D=8, dtype="float32", isolate=False)
    u = np.array([0.5] * len(hunt._space("gaussian", None)))
    e = obj(obj.case("gaussian", u, 0))
    assert e.ratio == 1e30 and e.cause == "implementation" and "CUDA context lost during this evaluation" in e.message
    assert obj.fault is e
    with pytest.raises(hunt.CudaContextLost, match="lost in gaussian:"):
        obj(obj.case("gaussian", u, 1))
    assert calls == [FAULTS_AT]


def test_hunt_in_a_child_replaces_it(clean_context):
    from lla_verify.commands import hunt

    impl = Impl(name="faulty", forward=faults_on_s24, description="faults on S = 24")
    u = np.array([0.5] * len(hunt._space("gaussian", None)))
    for S, lost in ((FAULTS_AT, True), (33, False)):
        obj = hunt.Objective(impl, "cpu", S=S, D=8, dtype="float32", timeout=120)
        try:
            first = obj(obj.case("gaussian", u, 0))
            second = obj(obj.case("gaussian", u, 1))  # a fresh child each time it faulted
        finally:
            obj.close()
        for e in (first, second):
            assert ("CUDA context lost during this evaluation" in e.message) == lost
            assert (e.ratio > 1) == lost


def faults_on_h2(q, k, v, *, ridge_lambda, qk_scale=None):
    """torch-fp32, except that on H = 2 its kernel faults (asynchronously: the call returns)."""
    from lla_verify.registry.impls import get_impl

    if q.shape[1] == 2:
        _plant_in_this_process()
    return get_impl("torch-fp32").forward(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


@pytest.mark.parametrize("in_child", [True, False])
def test_goldens_compare_blames_the_golden(in_child, clean_context, capsys):
    from lla_verify.goldens import compare as gcompare
    from lla_verify.goldens import store as gstore

    small, perq = "gaussian-f32-S16-D4-H2", "lambda-decades-perquery-f32-S16-D4"  # H = 2, H = 1
    fn = faults_on_h2 if in_child else (lambda *a, **k: faults_on_h2(*a, **k))
    impl = Impl(name="faulty", forward=fn, description="faults on H = 2")
    code, results = gcompare.compare(gstore.DEFAULT_DIR, impl, only=[small, perq], timeout=120)
    by = {r.name: r for r in results}
    assert code == 1 and by[small].lost_context and by[small].checks["forward"] == math.inf
    assert "CUDA context lost during this golden: AcceleratorError: CUDA error: an illegal memory access" \
        in by[small].notes
    assert [r.name for r in results] == [small, perq]  # the catalog's order: the fault comes first
    if in_child:
        assert by[perq].checks["forward"] <= 1 and not by[perq].lost_context
    else:
        assert math.isnan(by[perq].checks["forward"])
        assert by[perq].notes == f"[faulty] not run: the CUDA context of this process was lost in {small}"


# ------------------------------------------------------------------ a real fault (a GPU only)
import torch  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="a real CUDA fault needs a CUDA device")

# Two ways a kernel loses its context: a device-side assert (an index out of range) and an
# illegal memory access (a Triton store 4 TiB past its buffer).
_REAL_FAULTS = '''
import torch


def device_assert():
    x = torch.zeros(3, device="cuda")
    x[torch.tensor([5], device="cuda")] = 1.0  # asynchronous: the call returns


def illegal_address():
    import triton
    import triton.language as tl

    @triton.jit
    def far_store(p):
        tl.store(p + (1 << 40), 1.0)

    far_store[(1,)](torch.zeros(1, device="cuda"))
'''


def real_fault_on_s24(q, k, v, *, ridge_lambda, qk_scale=None):
    """The reference, whose 'kernel' trips a device-side assert on S = 24."""
    if q.shape[-2] == FAULTS_AT:
        x = torch.zeros(3, device=q.device)
        x[torch.tensor([5], device=q.device)] = 1.0
    return dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fault, needle", [("device_assert", "device-side assert"),
                                           ("illegal_address", "illegal memory access")])
def test_plugin_on_a_real_fault(pytester, fault, needle):
    pytester.makepyfile(faults=_REAL_FAULTS)
    pytester.makepyfile(test_real=f'''
import torch
import faults


def test_a():
    torch.ones(1, device="cuda").sum().item()


def test_b_faults():
    faults.{fault}()


def test_c():
    torch.ones(1, device="cuda").sum().item()
''')
    res = pytester.runpytest_subprocess("-p", "lla_verify.testing.pytest_plugin", "--lla-device", "cuda", "--lla-no-warmup", "-p", "no:cacheprovider",
                                        "-p", "no:xdist", "-rA")
    out = res.stdout.str()
    res.assert_outcomes(passed=2, errors=2)
    assert "ERROR at teardown of test_b_faults" in out and "CUDA context lost during this test" in out
    assert needle in out
    assert "not run: the CUDA context of this process was lost in test_real.py::test_b_faults" in out


@pytest.mark.gpu
@needs_cuda
def test_audit_on_a_real_fault_in_a_child(clean_context):
    impl = Impl(name="faulty", forward=real_fault_on_s24, description="device-side assert on S = 24")
    res = audit_run.run_audit(impl, CELLS, device="cuda", backward=False, cell_timeout=300)
    cells = res.report["cells"]
    assert "CUDA context lost during this cell" in cells[1]["message"] and "device-side assert" in cells[1]["message"]
    assert [c["passed"] for c in cells] == [True, False, True, True] and res.exit_code == 1
    assert torch.cuda.synchronize() is None  # this process's context is intact


_IN_PROCESS_AUDIT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import test_cuda_context as t
from lla_verify.audit import run as audit_run
from lla_verify.registry.impls import Impl

impl = Impl(name="faulty", forward=lambda *a, **k: t.real_fault_on_s24(*a, **k), description="here")
res = audit_run.run_audit(impl, t.CELLS, device="cuda", backward=False)
print(json.dumps([[c["cause"], c["message"]] for c in res.report["cells"]] + [res.exit_code]))
"""


@pytest.mark.gpu
@needs_cuda
def test_audit_on_a_real_fault_in_its_own_process():
    # in a child interpreter: the fault kills the context of the process it happens in
    import json
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-c", _IN_PROCESS_AUDIT, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    *cells, code = json.loads(run.stdout.strip().splitlines()[-1])
    assert code == 1 and cells[0][0] != "not run"
    assert "CUDA context lost during this cell" in cells[1][1] and "device-side assert" in cells[1][1]
    assert [c[0] for c in cells[2:]] == ["not run", "not run"]
