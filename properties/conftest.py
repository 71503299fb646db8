"""Options and fixtures of the property suite.

--lla-impl NAME|MODULE:CALLABLE   the implementation under test (default: triton)
--lla-device cpu|cuda|auto        where it runs (auto: cuda when available)

Under pytest-xdist each worker takes one GPU, round-robin (lla_verify.gpu_pinning),
before anything touches CUDA; the report header says which.
"""

from __future__ import annotations

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
