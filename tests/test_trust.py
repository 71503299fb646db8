"""The trust boundary (lla_verify/trust.py): an implementation under test cannot fool the verdict.

Each test plants a misbehaving implementation (tests/trust_planted.py; STYLE.md,
"Evaluators that were fooled") and asserts that every tool fails it, naming what
it did, with exit status 1: never a pass, never a usage error, never a traceback.
CPU only, small cases; the tests that go through a worker process each start one.
"""

from __future__ import annotations

import json
import os
import random
import re
import time

import pytest
import torch

from lla_verify import trust

from lla_verify.audit import plan as audit_plan
from lla_verify.audit import cell as audit_cell
from lla_verify.audit import run as audit_run

from lla_verify.commands import hunt

from lla_verify.testing import suite
from lla_verify.budget.backward import cotangent_for, impl_grads
from lla_verify.registry.cases import Case
from lla_verify.cli import main
from lla_verify.registry.impls import Impl
from lla_verify.oracles.dense import dense_torch_lla
from tests import trust_planted as planted

CASE = Case("gaussian", {"lam": 1.0}, S=24, D=8)
SPEC = CASE.spec()


def impl(name: str) -> Impl:
    return Impl(name=name, forward=getattr(planted, name), description=f"planted: {name}")


def problem(seed: int = 0, S: int = 24):
    return Case("gaussian", {"lam": 1.0}, S=S, D=8, seed=seed).build("cpu")


def forward(name: str, p=None):
    p = p or problem()
    return trust.call_forward(impl(name), p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)


def cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out + out.err


# ------------------------------------------------------------------ inputs modified
@pytest.mark.parametrize("name, tensor", [("fill_v", "v"), ("double_k", "k")])
def test_modified_inputs_fail_naming_the_tensor(name, tensor):
    p = problem()
    before = {n: getattr(p, n).clone() for n in "qkv"}
    with pytest.raises(trust.Misbehaved, match=rf"modified its inputs: {tensor} \(192 of 192 elements changed\)"):
        forward(name, p)
    for n in "qkv":  # the harness's own tensors were never handed over
        assert torch.equal(getattr(p, n), before[n]), n


def test_fill_v_fails_check_and_the_audit(capsys, tmp_path):
    # before the boundary: check PASS at ratio 5.9e-11 and audit --quick --no-backward 67 of 67
    rc, out = cli(["check", "--impl", "tests.trust_planted:fill_v", "--case", SPEC], capsys)
    assert rc == 1 and "forward modified its inputs: v" in out, out
    res = audit_run.run_audit(impl("double_k"), [audit_plan.Cell("test", CASE), audit_plan.Cell("test", Case("spectrum", {
        "kappa": 100.0, "rotate": 1}, S=20, D=8))], backward=False, out=str(tmp_path))
    assert res.exit_code == 1 and res.report["verdict"]["n_failed"] == 2
    assert all("modified its inputs: k" in c["message"] for c in res.report["cells"])


def test_gradient_path_checks_inputs_and_outputs():
    p = problem()
    cot = cotangent_for(p)

    def mutates_under_no_grad(q, k, v, *, ridge_lambda, qk_scale=None):
        with torch.no_grad():
            q.mul_(1.5)
        return dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)

    def detached(q, k, v, *, ridge_lambda, qk_scale=None):
        return dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale).detach()

    with pytest.raises(trust.Misbehaved, match="modified its inputs: q"):
        impl_grads(Impl("m", mutates_under_no_grad, "planted"), p, cot)
    with pytest.raises(trust.Misbehaved, match="does not require grad"):
        impl_grads(Impl("d", detached, "planted"), p, cot)
    g = impl_grads(Impl("h", planted.honest, "honest"), p, cot)
    assert all(type(g[n]) is torch.Tensor and g[n].shape == s for n, s in
               (("dq", p.q.shape), ("dk", p.k.shape), ("dv", p.v.shape), ("dlambda", p.q.shape[:-1])))


# ------------------------------------------------------------------ exits and interrupts
@pytest.mark.parametrize("name, reason", [("sys_exit", "raised SystemExit(0)"),
                                          ("raise_interrupt", "raised KeyboardInterrupt itself")])
def test_exit_and_own_interrupt_are_failed_verdicts(name, reason, capsys):
    with pytest.raises(trust.Misbehaved, match=re.escape(reason)):
        forward(name)
    with pytest.raises(trust.Misbehaved, match=re.escape(reason)):  # the property suite's calls
        suite.run(impl(name), problem())
    rc, out = cli(["check", "--impl", f"tests.trust_planted:{name}", "--case", SPEC], capsys)
    assert rc == 1 and reason in out, out


def test_os_exit_fails_its_cell_and_the_audit_goes_on(tmp_path):
    # in a subprocess: were the cells run in this process, os._exit(0) would end pytest
    # with status 0 and no output, the very failure this guards against
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "kernels")]))
    run = subprocess.run([sys.executable, "-m", "lla_verify", "audit", "--impl", "tests.trust_planted:libc_exit",
                          "--no-progress", "--no-backward", "--max-cells", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["verdict"]["n_failed"] == 2 and not rep["verdict"]["interrupted"]
    assert all("ended its process (exit status 0) without a result" in c["message"] for c in rep["cells"])


def test_os_exit_in_process_is_a_failed_call(monkeypatch):
    # the property suite calls the implementation in pytest's own process: os._exit there
    # raises instead, and the process (and os._exit itself) is intact afterwards
    real = os._exit
    with pytest.raises(trust.Misbehaved, match=re.escape("called os._exit(0) (tried to end the process)")):
        suite.run(impl("os_exit"), problem())
    assert os._exit is real


def test_a_hang_in_process_times_out_at_the_call_limit(monkeypatch):
    monkeypatch.setattr(trust, "CALL_LIMIT", 0.5)
    monkeypatch.setattr(trust, "_TIMED_OUT", {})
    t0 = time.monotonic()
    with pytest.raises(trust.Misbehaved, match=re.escape("timed out after 0.5 s")):
        suite.run(impl("hang"), problem())
    assert time.monotonic() - t0 < 30
    # Hypothesis replays a failing example: the hung implementation is not entered again
    with pytest.raises(trust.Misbehaved, match=re.escape("on an earlier call in this process (not called again)")):
        suite.run(impl("hang"), problem())
    # the timer is off again: a later honest call is not cut short
    assert suite.run(impl("honest"), problem()).shape == problem().v.shape


@pytest.mark.parametrize("name, needle", [("os_exit", "called os._exit(0)"), ("hang", "timed out after 2 s")])
def test_the_suite_fails_an_exiting_or_hanging_implementation(name, needle):
    # pytest itself, no xdist: exit status 1 with the reason, never 0 and never a block
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "kernels")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
                          "properties/test_identities.py::test_first_token_is_v0", "--lla-impl",
                          f"tests.trust_planted:{name}", "--lla-device", "cpu", "--lla-call-timeout", "2",
                          "--hypothesis-profile", "ci"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert needle in run.stdout, run.stdout[-3000:]


def test_hang_times_out_and_the_audit_goes_on(tmp_path):
    cells = [audit_plan.Cell("test", CASE), audit_plan.Cell("test", Case("gaussian", {"lam": 10.0}, S=17, D=8))]
    t0 = time.monotonic()
    res = audit_run.run_audit(impl("hang"), cells, backward=False, out=str(tmp_path), cell_timeout=1.0)
    assert res.exit_code == 1 and res.report["verdict"]["n_failed"] == 2
    assert all("timed out after 1 s" in c["message"] for c in res.report["cells"])
    assert time.monotonic() - t0 < 120


@pytest.mark.usefixtures("sigint_as_a_shell_gives_it")
def test_users_interrupt_still_stops_an_isolated_audit_with_a_partial_report(tmp_path):
    # SIGINT delivered to the sweep's process while a cell runs in the worker
    cells = [audit_plan.Cell("test", CASE), audit_plan.Cell("test", Case("gaussian", {"lam": 10.0}, S=17, D=8))]
    res = audit_run.run_audit(impl("interrupt_parent"), cells, backward=False, out=str(tmp_path))
    v = res.report["verdict"]
    assert res.exit_code == 1 and v["interrupted"] == "interrupted after 0 of 2 cells"
    assert "INCOMPLETE" in (tmp_path / "report.html").read_text()


def test_hunt_and_goldens_fail_an_exiting_implementation(tmp_path, capsys):
    obj = hunt.Objective(impl("sys_exit"), "cpu", S=12, D=4, dtype="float32")
    try:
        e = obj(obj.case("gaussian", [0.5, 0.5], 0))
    finally:
        obj.close()
    assert e.ratio > 1e29 and "raised SystemExit(0)" in e.message
    obj = hunt.Objective(impl("libc_exit"), "cpu", S=12, D=4, dtype="float32")
    try:
        e = obj(obj.case("gaussian", [0.5, 0.5], 0))
    finally:
        obj.close()
    assert e.ratio > 1e29 and "ended its process" in e.message
    obj = hunt.Objective(impl("hang"), "cpu", S=12, D=4, dtype="float32", timeout=1.0)
    try:
        e = obj(obj.case("gaussian", [0.5, 0.5], 0))
        again = obj(obj.case("gaussian", [0.5, 0.5], 1))  # the search goes on in a fresh worker
    finally:
        obj.close()
    assert e.ratio > 1e29 and "timed out after 1 s" in e.message and "timed out" in again.message
    rc, out = cli(["goldens", "compare", "--impl", "tests.trust_planted:sys_exit", "--only", "gaussian-f32-S16-D4-H2"],
                  capsys)
    assert rc == 1 and "raised SystemExit(0)" in out, out


# ------------------------------------------------------------------ return values
@pytest.mark.parametrize("name, says", [
    ("returns_list", "returned list of length 1 as the output o, not a torch.Tensor"),
    ("returns_none", "returned NoneType as the output o"),
    ("returns_tuple", "returned tuple of length 2 as the output o"),
    ("wrong_shape", r"of shape \(1, 1, 24, 7\), expected \(1, 1, 24, 8\)"),
    ("int64_output", "of dtype torch.int64, expected torch.float32 or torch.float64"),
    ("wrong_device", "on meta, expected cpu"),
    ("subclass_output", "returned a Lazy \\(a torch.Tensor subclass\\)"),
])
def test_wrong_return_values_are_named(name, says):
    with pytest.raises(trust.Misbehaved, match=says):
        forward(name)


def test_wrong_return_values_fail_the_cell_not_the_harness():
    # before the boundary: a list or None gave a traceback, an int64 output a usage error
    for name in ("returns_list", "returns_none", "int64_output"):
        rec = audit_cell.run_cell(audit_plan.Cell("test", CASE), impl(name), "cpu", backward=False)
        assert not rec["passed"] and rec["cause"] == "implementation" and "returned" in rec["message"], rec


def test_int64_output_is_a_failure_not_a_usage_error(capsys):
    rc, out = cli(["check", "--impl", "tests.trust_planted:int64_output", "--case", SPEC], capsys)
    assert rc == 1 and "dtype torch.int64" in out and "--case" not in out.split("\n")[0], out


def test_stats_that_are_not_per_query_tensors_are_left_out():
    p = problem()

    def odd_stats(q, k, v, *, ridge_lambda, qk_scale=None):
        o = dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)
        lead = q.shape[:-1]
        return o, {"cg_iters": torch.ones(lead), "cg_residual": torch.zeros(lead).as_subclass(planted.Lazy),
                   "note": "x", "total": torch.tensor(3.0)}

    rec = Impl("s", planted.honest, "x", forward_with_stats=odd_stats)
    _, st = trust.call_forward(rec, p.q, p.k, p.v, ridge_lambda=1.0, qk_scale=None, stats=True)
    assert set(st) == {"cg_iters"} and type(st["cg_iters"]) is torch.Tensor


def test_output_is_the_harness_copy():
    p = problem()
    kept = []

    def keeps_its_output(q, k, v, *, ridge_lambda, qk_scale=None):
        o = dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)
        kept.append(o)
        return o

    o, _ = trust.call_forward(Impl("k", keeps_its_output, "x"), p.q, p.k, p.v, ridge_lambda=1.0, qk_scale=None)
    kept[0].zero_()  # work the implementation does on its output afterwards cannot reach the verdict
    assert o.data_ptr() != kept[0].data_ptr() and bool(o.abs().sum() > 0)


# ------------------------------------------------------------------ freed memory
def test_empty_output_fails():
    rec = audit_cell.run_cell(audit_plan.Cell("test", CASE), impl("empty_output"), "cpu", backward=False)
    # poisoned memory (NaN, or malloc's own bookkeeping in the first bytes) is far outside any budget
    assert not rec["passed"] and rec["forward_ratio"] > 1e3, rec["forward_ratio"]


def test_empty_output_cannot_pick_up_a_freed_reference():
    # the attack of KernelBench PR 82: the float64 reference output is freed just before
    # the call, and the implementation asks for memory of its size
    from lla_verify.oracles.float64 import lla_forward

    p = problem(S=512)
    ref = lla_forward(p.q, p.k, p.v, ridge_lambda=1.0)
    values = ref.clone()
    del ref
    o, _ = forward("empty_float64_output", p)
    recovered = float((o == values).float().mean())
    assert recovered < 0.01, f"{recovered:.1%} of the freed reference came back through torch.empty"


def _fragment(rng: random.Random) -> list:
    # a long pytest worker's heap: many free holes of assorted sizes between live blocks
    holes = [torch.empty(rng.randint(1, 20000) * 8, dtype=torch.uint8) for _ in range(rng.randint(0, 300))]
    rng.shuffle(holes)
    del holes[::2]
    return holes


def _survivors(dtype, trials: int, fresh: bool) -> dict:
    """Per element count, the trials in which torch.empty handed back a freed block's values."""
    rng = random.Random(0)
    survived = {}
    for _ in range(trials):
        live = _fragment(rng)
        numel = rng.choice([64, 500, 4096, 12345])
        values = torch.randn(numel, dtype=torch.float64).to(dtype)
        ref = values.clone()
        del ref
        trust.poison("cpu", values.numel())
        with trust.FreshHeap("cpu", enabled=fresh):
            got = torch.empty(values.shape, dtype=dtype)
        if float((got == values).float().mean()) > 0.01:
            survived[numel] = survived.get(numel, 0) + 1
        del live
    return survived


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_poison_overwrites_most_freed_blocks(dtype):
    # whether malloc reuses a given block depends on the heap's history: one round of
    # poisoning leaves 10-30% of these trials' blocks intact, the CPU rounds under 2%;
    # the bound measures the rate rather than one heap's luck
    survived = _survivors(dtype, 150, fresh=False)
    assert sum(survived.values()) <= 7, (
        f"{sum(survived.values())} of 150 freed blocks survived the poisoning (by element count: {survived})")


@pytest.mark.skipif(trust._MALLOPT is None, reason="mallopt(M_PERTURB) needs glibc")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fresh_heap_never_hands_back_a_freed_block(dtype):
    survived = _survivors(dtype, 150, fresh=True)
    assert not survived, f"torch.empty returned a freed block's values inside FreshHeap: {survived}"
    with trust.FreshHeap("cpu") as fresh:
        assert fresh.active and bool((torch.empty(4096, dtype=dtype) == 0).all())


# ------------------------------------------------------------------ pointer caches
def test_consecutive_calls_get_fresh_addresses():
    # the same problem again and again (a determinism property, a timing loop): a cache
    # keyed on the input addresses must miss every time, so the implementation computes
    p = problem(S=512)
    planted.COMPUTED.clear()
    for _ in range(12):
        o, _ = forward("pointer_cache", p)
    assert len(planted.COMPUTED) == 12, \
        f"a data_ptr-keyed cache replayed {12 - len(planted.COMPUTED)} of 12 calls"
    o2 = suite.run(impl("pointer_cache"), problem(seed=1))
    assert not torch.equal(o2, o)


# ------------------------------------------------------------------ clocks
def test_patched_timer_does_not_fool_the_cells_time(monkeypatch):
    monkeypatch.setattr(time, "perf_counter", time.perf_counter)  # restored after the test
    rec = audit_cell.run_cell(audit_plan.Cell("test", CASE), impl("fake_clock"), "cpu", backward=False)
    assert rec["time_s"] >= 0.2, rec["time_s"]


def test_bench_clock_is_out_of_the_implementations_reach(monkeypatch):
    monkeypatch.setattr(time, "perf_counter", time.perf_counter)  # restored after the test
    p = problem()
    times, o = trust.timed_calls(lambda: planted.fake_clock(p.q, p.k, p.v, ridge_lambda=1.0), device="cpu", reps=2)
    assert min(times) >= 0.2, times
    assert type(o) is torch.Tensor


def test_bench_floor_and_disagreement():
    h200 = trust.device_peaks("NVIDIA H200")
    assert h200 == trust.PEAKS["H200"] and trust.device_peaks("a future GPU") == trust.UNKNOWN_PEAK
    # (16, 1, 2048, 64) bf16: 2 S (S + 1) D B H flops = 8.6e9 at 989 TFLOP/s, 8.7 us
    floor = trust.lla_forward_floor_s(16, 1, 2048, 64, 2, h200)
    assert floor == pytest.approx(2 * 16 * 2048 * 2049 * 64 / 989e12)
    assert trust.implausible_speed(2.6e-3, floor) is None  # the public kernel's time
    assert trust.implausible_speed(1e-6, floor)  # a cached or skipped computation
    assert trust.timing_disagrees(1e-3, 2.7e-3)  # events saw a third of the work
    assert trust.timing_disagrees(2.5e-3, 2.6e-3) is None


def test_roofline_flags_a_speed_beyond_the_hardware():
    floor = trust.roofline_floor_s(flops=2e12, bytes_moved=1e9, peak_flops=1e15, peak_bytes_s=4.8e12)
    assert floor == pytest.approx(2e-3)
    assert trust.implausible_speed(1e-4, floor) and "below the hardware's floor" in trust.implausible_speed(1e-4, floor)
    assert trust.implausible_speed(3e-3, floor) is None
    assert trust.implausible_speed(0.0, floor)


# ------------------------------------------------------------------ the CG study
def _with_stats(fn, stats):
    def forward_with_stats(q, k, v, *, ridge_lambda, qk_scale=None, cg_tol=None, cg_max_iters=None,
                           preconditioner=None):
        o = fn(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)
        lead = tuple(q.shape[:-1])
        return o, {key: torch.ones(lead) for key in stats}
    return Impl(name=fn.__name__, forward=fn, description="planted", forward_with_stats=forward_with_stats)


@pytest.mark.parametrize("name, stats, reason", [
    ("double_k", ("cg_iters", "cg_residual"), "modified its inputs: k"),
    ("sys_exit", ("cg_iters", "cg_residual"), "SystemExit"),
    ("honest", ("cg_iters",), "no per-query cg_residual"),
])
def test_cg_study_runs_the_implementation_across_the_boundary(name, stats, reason):
    from lla_verify.cg.kernel import run_kernel

    p = problem(S=8)
    with pytest.raises(trust.Misbehaved, match=reason):
        run_kernel(_with_stats(getattr(planted, name), stats), p, tol=1e-6, max_iters=8)


def test_cg_study_of_honest_statistics_runs():
    from lla_verify.cg.kernel import run_kernel

    p = problem(S=8)
    kr = run_kernel(_with_stats(planted.honest, ("cg_iters", "cg_residual")), p, tol=1e-6, max_iters=8)
    assert kr.o.shape == p.v.shape and kr.iters.shape == p.q.shape[:-1] and kr.rho is None
