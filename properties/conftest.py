"""Options and fixtures of the property suite.

--lla-impl NAME|MODULE:CALLABLE   the implementation under test (default: triton)
--lla-device cpu|cuda|auto        where it runs (auto: cuda when available)

Under pytest-xdist each worker takes one GPU, round-robin (lla_verify.gpu_pinning),
before anything touches CUDA; the report header says which.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from lla_verify import gpu_pinning

# Must run at import, before torch creates a CUDA context in this worker.
_PINNED = gpu_pinning.pin_current_worker()

import torch  # noqa: E402

from lla_verify.impls import get_impl, is_available  # noqa: E402
from lla_verify.validate import LLAInputError  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("lla-verify")
    g.addoption("--lla-impl", default=os.environ.get("LLA_IMPL", "triton"),
                help="implementation under test: a built-in name (triton, torch-fp32, oracle-f64, flashlla) "
                     "or MODULE:CALLABLE following fn(q, k, v, *, ridge_lambda, qk_scale) -> o")
    g.addoption("--lla-device", default=os.environ.get("LLA_DEVICE", "auto"), choices=("auto", "cpu", "cuda"),
                help="device the implementation runs on (auto: cuda if available)")


def pytest_xdist_auto_num_workers(config):
    n_gpu = len(gpu_pinning.visible_devices())
    if n_gpu == 0:
        return None  # xdist's default: one per CPU
    return gpu_pinning.workers_for(n_gpu, os.cpu_count() or 1)


def _device(config) -> str:
    d = config.getoption("--lla-device")
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return d


def pytest_report_header(config):
    spec = config.getoption("--lla-impl")
    try:
        impl = get_impl(spec)
        desc = impl.description
    except LLAInputError as exc:
        desc = f"unresolved: {exc}"
    pin = f"worker pinned to GPU {_PINNED}" if _PINNED is not None else "no GPU pinning"
    return [f"lla-verify: impl={spec} ({desc}); device={_device(config)}; {pin}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    d = _device(pytestconfig)
    if d == "cuda" and not torch.cuda.is_available():
        pytest.skip("--lla-device cuda requested but no CUDA device is available")
    return d


@pytest.fixture(scope="session")
def impl(pytestconfig, device):
    spec = pytestconfig.getoption("--lla-impl")
    try:
        record = get_impl(spec)
    except LLAInputError as exc:
        raise pytest.UsageError(str(exc))
    reason = is_available(record, device)
    if reason:
        pytest.skip(f"implementation {record.name} unavailable: {reason}")
    return record


# ---- one closing line for the whole run: "k of N checks over threshold, worst ratio r at <case>"
def _ledger(config) -> list:
    from lla_verify import budget

    return list(budget.LEDGER) + getattr(config, "_lla_worker_ledgers", [])


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the ledger to the controller
        from lla_verify import budget

        session.config.workeroutput["lla_ledger"] = json.dumps(budget.LEDGER)


try:
    import xdist  # noqa: F401

    def pytest_testnodedown(node, error):
        led = json.loads(getattr(node, "workeroutput", {}).get("lla_ledger", "[]"))
        node.config._lla_worker_ledgers = getattr(node.config, "_lla_worker_ledgers", []) + [tuple(x) for x in led]
except ImportError:
    pass


def pytest_terminal_summary(terminalreporter, config):
    # One line per implementation checked, planted bugs apart: tests/ feeds mutants
    # through the same budgets and they must fail, so a single count over everything
    # would read "31 over threshold" on a green run and hide a real failure among them.
    from lla_verify.budget import THRESHOLD
    from lla_verify.mutants import MUTANTS

    led = _ledger(config)
    if not led:
        return
    groups: dict = {}
    for row in led:
        groups.setdefault("planted bugs (must fail)" if row[1] in MUTANTS else row[1], []).append(row)
    for name in sorted(groups, key=lambda n: (n.startswith("planted"), n)):
        rows = groups[name]
        over = [x for x in rows if not x[2] <= THRESHOLD]
        worst = max(rows, key=lambda x: x[2] if not math.isnan(x[2]) else math.inf)
        terminalreporter.write_line(
            f"lla-verify: {name}: {len(over)} of {len(rows)} checks over threshold, worst ratio {worst[2]:.3g} "
            f"({worst[0]}, {worst[1]}) at {worst[3]}")
