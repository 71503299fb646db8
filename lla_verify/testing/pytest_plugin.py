"""The pytest plugin of the property suite: its options, fixtures, Hypothesis profiles,
GPU pinning and closing summary line.

Installed, it is registered through the ``pytest11`` entry point, so the suite runs
from any folder::

    pytest --pyargs lla_verify_properties --lla-impl mypkg:fn -n auto

In the source tree, the root conftest.py names it in ``pytest_plugins`` for an
environment where the entry point is not installed; the entry point's name is this
module's name, so pytest registers it once either way. ``-p no:lla_verify.testing.pytest_plugin``
turns it off.

--lla-impl NAME|MODULE:CALLABLE   the implementation under test (default: triton)
--lla-device cpu|cuda|auto        where it runs (auto: cuda when available)
--lla-parallax-impl NAME|MODULE:CALLABLE   the Parallax implementation under test
                                  (default: parallax-dense, the fp32 dense reference)
--lla-decode-impl NAME|MODULE:CALLABLE     the LLA decode implementation under test
                                  (default: lla-decode-triton, kernels/lla_decode)
--lla-parallax-decode-impl NAME|MODULE:CALLABLE   the Parallax decode implementation
                                  (default: parallax-decode-triton, kernels/parallax_decode)

Hypothesis profiles (select with --hypothesis-profile):

ci:      CPU through the Triton interpreter: derandomized, no example database, bounded.
dev:     a quick local loop, random; the default of a run of the suite.
gpu:     compiled kernels on a GPU, real sizes, more examples.
release: many examples, guided by target() towards the worst error/budget ratio.
triage:  the ci profile without shrinking: reports the first failing example fast
         (used to measure the suite against planted bugs, docs/kill-list.md).

After each test on a process that uses CUDA the plugin synchronises the device: a test
whose kernel faulted (an illegal memory access, a device-side assert: errors that kill
the process's CUDA context) gets an error at teardown that says so, and every later test
of that process (that xdist worker) an error at setup, "not run", without calling into
CUDA (lla_verify/testing/cuda_context.py).

Under pytest-xdist each worker takes one GPU, round-robin (lla_verify.testing.gpu_pinning),
before anything touches CUDA; LLA_NO_GPU_PINNING=1 leaves CUDA_VISIBLE_DEVICES alone.

An installed plugin is loaded by every pytest run of its environment, so what changes
a run (the report header line, the default profile, torch threads per worker, the
worker count of ``-n auto``) applies only to a run of lla-verify's own: one that
names the suite, passes an ``--lla-`` option, or runs in lla-verify's source tree.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from lla_verify.testing import gpu_pinning

# Must run at import, before torch creates a CUDA context in this worker: xdist sets
# PYTEST_XDIST_WORKER before its workers load their plugins.
PINNED = gpu_pinning.pin_current_worker()

_common = dict(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile("ci", max_examples=10, derandomize=True, database=None, deadline=None, **_common)
settings.register_profile("dev", max_examples=20, deadline=None, **_common)
# No per-example deadline on the GPU: the float64 gradient check of a D = 128 example
# took 108 s beside 13 other workers and failed as a "deadline", a finding about the
# machine's load, not the kernel. The suite's wall time is measured instead
# (docs/performance.md), never asserted.
settings.register_profile("gpu", max_examples=40, deadline=None, derandomize=False, **_common)
settings.register_profile(
    "release", max_examples=400, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink], **_common,
)
settings.register_profile(
    "triage", max_examples=10, derandomize=True, database=None, deadline=None,
    phases=[Phase.explicit, Phase.generate], **_common,
)

_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def pytest_addoption(parser):
    g = parser.getgroup("lla-verify")
    g.addoption("--lla-impl", default=os.environ.get("LLA_IMPL", "triton"),
                help="implementation under test: a built-in name (triton, torch-fp32, oracle-f64, flashlla) "
                     "or MODULE:CALLABLE following fn(q, k, v, *, ridge_lambda, qk_scale) -> o")
    g.addoption("--lla-parallax-impl", default=os.environ.get("LLA_PARALLAX_IMPL", "parallax-dense"),
                help="Parallax implementation under test: a built-in name (parallax-dense, parallax-oracle, "
                     "parallax-triton, parallax-triton-bf16w) or MODULE:CALLABLE following "
                     "fn(q, k, v, r, *, qk_scale) -> o")
    g.addoption("--lla-decode-impl", default=os.environ.get("LLA_DECODE_IMPL", "lla-decode-triton"),
                help="LLA decode implementation under test (properties/test_decode.py): a built-in name "
                     "(lla-decode-triton, lla-decode-keyed, lla-decode-oracle) or MODULE:CALLABLE following "
                     "fn(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale) -> o")
    g.addoption("--lla-parallax-decode-impl",
                default=os.environ.get("LLA_PARALLAX_DECODE_IMPL", "parallax-decode-triton"),
                help="Parallax decode implementation under test (properties/test_decode.py): a built-in name "
                     "(parallax-decode-triton, parallax-decode-oracle) or MODULE:CALLABLE following "
                     "fn(q, r, k_cache, v_cache, lengths, *, qk_scale) -> o")
    g.addoption("--lla-device", default=os.environ.get("LLA_DEVICE", "auto"), choices=("auto", "cpu", "cuda"),
                help="device the implementation runs on (auto: cuda if available)")
    g.addoption("--lla-tensor-cores", action="store_true",
                default=os.environ.get("LLA_TENSOR_CORES", "") not in ("", "0"),
                help="under the Triton interpreter, round fp32 tl.dot operands as the GPU's tensor cores do "
                     "(tf32 / tf32x3; lla_verify/testing/tensor_cores.py) instead of multiplying exact fp32: "
                     "CPU runs then see the products' GPU error. No effect on compiled kernels")
    g.addoption("--lla-gpu-fp32", action="store_true",
                default=os.environ.get("LLA_GPU_FP32", "") not in ("", "0"),
                help="under the Triton interpreter, sum fp32 'ieee' tl.dot products in the GPU's FMA chain and "
                     "round tl.exp's argument x log2(e) as the GPU does (lla_verify/testing/gpu_fp32.py): CPU runs "
                     "then see the scores' and weights' GPU error. No effect on compiled kernels")
    g.addoption("--lla-no-warmup", action="store_true",
                default=os.environ.get("LLA_NO_WARMUP", "") not in ("", "0"),
                help="on CUDA, do not compile the Triton kernels for every (dtype, D) side by side before "
                     "the tests start (lla_verify/testing/warmup.py); each is then compiled when first met")
    g.addoption("--lla-call-timeout", type=float, default=float(os.environ.get("LLA_CALL_TIMEOUT", "300")),
                metavar="SECONDS",
                help="one call of the implementation may run this long before it fails as timed out "
                     "(default 300; 0 for no limit). A hang in native code that never returns to Python "
                     "is beyond this: run the suite with -n (xdist reports a dead or stuck worker)")


def _in_play(config) -> bool:
    """Whether this run is lla-verify's (see the module docstring)."""
    known = getattr(config, "_lla_in_play", None)
    if known is None:
        known = config._lla_in_play = _decide_in_play(config)
    return known


def _decide_in_play(config) -> bool:
    if os.environ.get("LLA_IMPL") or os.environ.get("LLA_DEVICE") or os.environ.get("LLA_PARALLAX_IMPL"):
        return True
    if any(str(a).startswith("--lla-") for a in config.invocation_params.args):
        return True
    if config.rootpath.resolve() == _SOURCE_ROOT and (_SOURCE_ROOT / "properties").is_dir():
        return True
    from lla_verify.testing.location import SUITE_PACKAGE, suite_dir

    here = suite_dir().resolve()
    for arg in config.args:
        target = str(arg).split("::")[0]
        if config.option.pyargs and target.split(".")[0] == SUITE_PACKAGE:
            return True
        path = (config.invocation_params.dir / target).resolve()
        if path == here or here in path.parents:
            return True
    return False


MARKERS = (
    "gpu: needs a CUDA device (skipped with a reason on CPU)",
    "slow: minutes rather than seconds; deselect with -m 'not slow'",
    "mp: uses the mpmath oracle (high precision, small sizes)",
    "interp: runs Triton kernels, through the interpreter on CPU",
)


def pytest_configure(config):
    for line in MARKERS:  # the suite's marks, wherever it runs
        config.addinivalue_line("markers", line)
    if not _in_play(config):
        return
    limit = config.getoption("--lla-call-timeout")
    if not (limit >= 0 and limit != float("inf")):
        raise pytest.UsageError(f"--lla-call-timeout: expected a number of seconds >= 0, got {limit:g}")
    from lla_verify import trust

    trust.CALL_LIMIT = limit or None
    _check_decode_names(config)
    _warm_up(config)
    if config.getoption("--lla-tensor-cores") and os.environ.get("TRITON_INTERPRET", "0") == "1":
        from lla_verify.testing import tensor_cores

        tensor_cores.install()
    if config.getoption("--lla-gpu-fp32") and os.environ.get("TRITON_INTERPRET", "0") == "1":
        from lla_verify.testing import gpu_fp32

        gpu_fp32.install()
    # A run of the suite defaults to the dev profile; --hypothesis-profile, applied by
    # Hypothesis's own plugin, takes precedence.
    if getattr(config.option, "hypothesis_profile", None) is None:
        settings.load_profile("dev")
    # Under xdist, each worker takes its share of the CPUs for torch's CPU work (the
    # float64 oracles): torch's default of every CPU per worker oversubscribes n-fold.
    n = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if n:
        import torch

        torch.set_num_threads(gpu_pinning.threads_per_worker(os.cpu_count() or 1, int(n)))


def _warm_up(config) -> None:
    """Compile the kernels for every (dtype, D) side by side, once, before any worker starts
    (lla_verify/testing/warmup.py says why): on the xdist controller or the lone process, on
    CUDA, compiled (not interpreted) kernels, and not for --help or --collect-only."""
    if (config.getoption("--lla-no-warmup") or os.environ.get("PYTEST_XDIST_WORKER")
            or os.environ.get("TRITON_INTERPRET", "0") == "1" or config.option.help
            or config.option.collectonly or _device(config) != "cuda"):
        return
    import time

    import torch

    if not torch.cuda.is_available():
        return
    from lla_verify.testing import warmup

    from lla_verify.registry.operators import TRITON_BUILTINS

    # each package only when a property runs it
    others = [config.getoption(o) for o in ("--lla-decode-impl", "--lla-parallax-decode-impl", "--lla-parallax-impl")]
    packages = sorted({TRITON_BUILTINS[s] for s in others if s in TRITON_BUILTINS})
    if config.getoption("--lla-impl") == "triton":
        packages[:0] = warmup.LLA_VARIANTS
    t0 = time.perf_counter()
    res = warmup.warm(packages, device="cuda")
    bad = [f"{p} {dt} D={d}: {err}" for p, dt, d, _, err in res if err is not None]
    config._lla_warmup = (f"lla-verify: compiled {len(res) - len(bad)} of {len(res)} kernel configurations "
                          f"in {time.perf_counter() - t0:.0f} s before the tests"
                          + (f"; failed: {'; '.join(bad)}" if bad else ""))


# optional: without xdist (-p no:xdist, or not installed) the hook does not exist, and a
# required one is a pytest INTERNALERROR before any test runs
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    n_gpu = len(gpu_pinning.visible_devices())
    if n_gpu == 0 or not _in_play(config):
        return None  # xdist's default: one per CPU
    return gpu_pinning.workers_for(n_gpu, os.cpu_count() or 1)


def _device(config) -> str:
    d = config.getoption("--lla-device")
    if d == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return d


def pytest_report_header(config):
    if not _in_play(config):
        return None
    from lla_verify.registry.impls import get_impl
    from lla_contract import LLAInputError

    spec = config.getoption("--lla-impl")
    try:
        desc = get_impl(spec).description
    except LLAInputError as exc:
        desc = f"unresolved: {exc}"
    pin = f"worker pinned to GPU {PINNED}" if PINNED is not None else "no GPU pinning"
    px_spec = config.getoption("--lla-parallax-impl")
    dec = (f"decode impls={config.getoption('--lla-decode-impl')}, "
           f"{config.getoption('--lla-parallax-decode-impl')}")
    return [f"lla-verify: impl={spec} ({desc}); parallax impl={px_spec}; {dec}; device={_device(config)}; {pin}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
            + ("; tensor-core rounding emulated" if config.getoption("--lla-tensor-cores") else "")
            + ("; GPU fp32 dot and exp emulated" if config.getoption("--lla-gpu-fp32") else "")]


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    import torch

    d = _device(pytestconfig)
    if d == "cuda" and not torch.cuda.is_available():
        pytest.skip("--lla-device cuda requested but no CUDA device is available")
    return d


@pytest.fixture(scope="session")
def impl(pytestconfig, device):
    from lla_verify.registry.impls import get_impl, is_available
    from lla_contract import LLAInputError

    spec = pytestconfig.getoption("--lla-impl")
    try:
        record = get_impl(spec)
    except LLAInputError as exc:
        raise pytest.UsageError(str(exc))
    reason = is_available(record, device)
    if reason:
        pytest.skip(f"implementation {record.name} unavailable: {reason}")
    return record


@pytest.fixture(scope="session")
def parallax_impl(pytestconfig, device):
    """The Parallax implementation under test (--lla-parallax-impl); skipped with the
    reason when it cannot run here (parallax_triton not importable, no interpreter)."""
    from lla_verify.registry.parallax import get_parallax_impl, is_parallax_available
    from lla_contract import LLAInputError

    spec = pytestconfig.getoption("--lla-parallax-impl")
    try:
        record = get_parallax_impl(spec)
    except LLAInputError as exc:
        raise pytest.UsageError(str(exc))
    reason = is_parallax_available(record, device)
    if reason:
        pytest.skip(f"Parallax implementation {record.name} unavailable: {reason}")
    return record


def _check_decode_names(config) -> None:
    """A decode implementation that is neither a built-in name nor MODULE:CALLABLE is a usage
    error before any test runs (a MODULE:CALLABLE is imported by its first property, so
    that importing it cannot change how the package kernels compile)."""
    from lla_verify.registry.operators import get_operator

    for op, opt in (("lla-decode", "--lla-decode-impl"), ("parallax-decode", "--lla-parallax-decode-impl")):
        spec = config.getoption(opt)
        builtins = get_operator(op).builtins
        if ":" not in spec and spec not in builtins:
            raise pytest.UsageError(f"{opt}: unknown implementation {spec!r}; expected one of {list(builtins)} "
                                    f"or MODULE:CALLABLE")


def _decode_impl(config, op: str, opt: str):
    from lla_contract import LLAInputError
    from lla_verify.registry.operators import get_operator

    operator = get_operator(op)
    try:
        record = operator.resolve(config.getoption(opt), opt)
    except LLAInputError as exc:
        raise pytest.UsageError(str(exc))
    return operator, record


def _decode_reason(operator, record, device) -> str | None:
    from lla_verify.registry.operators import TRITON_BUILTINS

    # the registry would switch the interpreter on for a CPU run; a test process must not
    # change how the kernels of its other tests compile, so it says what is missing instead
    if (record.name in TRITON_BUILTINS and device == "cpu"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        return "its Triton kernels need TRITON_INTERPRET=1 on CPU"
    return operator.available(record, device)


@pytest.fixture(scope="session")
def decode_impl(pytestconfig, device):
    """The LLA decode implementation under test (--lla-decode-impl), resolved through the
    registry's lla-decode operator; skipped with the reason when it cannot run here."""
    operator, record = _decode_impl(pytestconfig, "lla-decode", "--lla-decode-impl")
    reason = _decode_reason(operator, record, device)
    if reason:
        pytest.skip(f"LLA decode implementation {record.name} unavailable: {reason}")
    return record


@pytest.fixture(scope="session")
def parallax_decode_impl(pytestconfig, device):
    """The Parallax decode implementation under test (--lla-parallax-decode-impl)."""
    operator, record = _decode_impl(pytestconfig, "parallax-decode", "--lla-parallax-decode-impl")
    reason = _decode_reason(operator, record, device)
    if reason:
        pytest.skip(f"Parallax decode implementation {record.name} unavailable: {reason}")
    return record


# ---- a lost CUDA context is charged to the test that lost it, not to the tests after it
LOST_PREFIX = "CUDA context lost during this test: "
NOT_RUN_PREFIX = "not run: the CUDA context of this process was lost in "


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # first of the setup hooks, so no fixture (and no CUDA call) runs for a test that cannot
    from lla_verify.testing import cuda_context

    where = cuda_context.lost_in()
    if where is not None and _in_play(item.config):
        pytest.fail(f"{NOT_RUN_PREFIX}{where} (every later test of this process is an error, not a verdict: "
                    f"rerun them in a fresh process)", pytrace=False)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item, nextitem):
    # after the test's fixtures are torn down: a fault in a fixture's teardown is the test's too
    from lla_verify.testing import cuda_context

    try:
        return (yield)
    finally:
        if cuda_context.lost_in() is None and _in_play(item.config):
            err = cuda_context.check(item.nodeid)
            if err is not None:
                pytest.fail(f"{LOST_PREFIX}{err}; the implementation faulted (the later tests of this process "
                            f"are not run)", pytrace=False)


def pytest_runtest_logreport(report):
    # on the xdist controller too: the closing summary names each lost context once
    if report.failed and report.when in ("setup", "teardown"):
        text = report.longreprtext or ""
        if LOST_PREFIX in text or NOT_RUN_PREFIX in text:
            _LOST_REPORTS.append((report.nodeid, LOST_PREFIX in text))


_LOST_REPORTS: list = []


# ---- one closing line for the whole run: "k of N checks over threshold, worst ratio r at <case>"
# The ledger lives in lla_verify.budget.verdict; a run that never imported it has nothing to say.
def _own_ledger() -> list:
    verdict = sys.modules.get("lla_verify.budget.verdict")
    return list(verdict.LEDGER) if verdict is not None else []


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the ledger to the controller
        session.config.workeroutput["lla_ledger"] = json.dumps(_own_ledger())


# xdist's hook, called on the controller when a worker finishes; optional, so that a
# run without xdist does not refuse it as unknown.
@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    led = json.loads(getattr(node, "workeroutput", {}).get("lla_ledger", "[]"))
    node.config._lla_worker_ledgers = getattr(node.config, "_lla_worker_ledgers", []) + [tuple(x) for x in led]


def pytest_terminal_summary(terminalreporter, config):
    # One line per implementation checked, planted bugs apart: tests/ feeds mutants
    # through the same budgets and they must fail, so a single count over everything
    # would read "31 over threshold" on a green run and hide a real failure among them.
    if getattr(config, "_lla_warmup", None):
        terminalreporter.write_line(config._lla_warmup)
    blamed = [n for n, lost in _LOST_REPORTS if lost]
    if blamed:
        n_not_run = sum(1 for _, lost in _LOST_REPORTS if not lost)
        terminalreporter.write_line(
            f"lla-verify: the CUDA context was lost in {len(blamed)} test(s): {', '.join(blamed)}; "
            f"{n_not_run} later test(s) of the same process(es) not run (errors, not verdicts)", red=True)
    led = _own_ledger() + getattr(config, "_lla_worker_ledgers", [])
    if not led:
        return
    from lla_verify.budget.verdict import THRESHOLD
    from lla_verify.testing.mutants import MUTANTS, PARALLAX_MUTANTS

    planted = set(MUTANTS) | set(PARALLAX_MUTANTS) | {f"lla_verify.testing.mutants:{n}" for n in PARALLAX_MUTANTS}
    groups: dict = {}
    for row in led:
        is_planted = row[1] in planted or row[1].startswith("planted:")
        groups.setdefault("planted bugs (must fail)" if is_planted else row[1], []).append(row)
    for name in sorted(groups, key=lambda n: (n.startswith("planted"), n)):
        rows = groups[name]
        over = [x for x in rows if not x[2] <= THRESHOLD]
        worst = max(rows, key=lambda x: x[2] if not math.isnan(x[2]) else math.inf)
        terminalreporter.write_line(
            f"lla-verify: {name}: {len(over)} of {len(rows)} checks over threshold, worst ratio {worst[2]:.3g} "
            f"({worst[0]}, {worst[1]}) at {worst[3]}")
