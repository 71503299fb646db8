"""The interpreter's emulation of tensor-core fp32 products (lla_verify/testing/tensor_cores.py),
and the lla_triton backward case it exists for."""

from __future__ import annotations

import numpy as np
import pytest

from lla_verify.testing.tensor_cores import emulated_dot, round_to_tf32
from lla_verify.testing.kernel_device import kernel_device


def test_round_to_tf32_keeps_ten_significand_bits_ties_away():
    x = np.array([1 + 2.0**-10, 1 + 2.0**-11, 1 + 2.0**-12, -(1 + 2.0**-11), 3.0, np.inf, -np.inf],
                 dtype=np.float32)
    want = np.array([1 + 2.0**-10, 1 + 2.0**-10, 1.0, -(1 + 2.0**-10), 3.0, np.inf, -np.inf], dtype=np.float32)
    np.testing.assert_array_equal(round_to_tf32(x), want)
    assert np.isnan(round_to_tf32(np.array([np.nan], dtype=np.float32)))[0]


def test_emulated_products_sit_between_tf32_and_fp32():
    """Single products (length-1 dots, no accumulation), worst over 256^2: fp32 rounds
    each to 2^-24 relative; tf32x3 loses the dropped tail x tail and the tails' own
    rounding (up to about 2^-21, 8 u_fp32); tf32 rounds each operand to 2^-11."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 1)).astype(np.float32)
    b = rng.standard_normal((1, 256)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)

    def rel(c):
        return float(np.max(np.abs(c - exact) / np.abs(exact)))

    err = {p: rel(emulated_dot(a, b, p)) for p in ("tf32", "tf32x3")}
    err["ieee"] = rel(np.matmul(a, b, dtype=np.float32))
    assert emulated_dot(a, b, "ieee") is None
    assert err["ieee"] <= 2.0**-24
    assert 2.0**-22 < err["tf32x3"] < 2.0**-20
    assert err["tf32"] > 2.0**-12


CPU_ONLY = pytest.mark.skipif(kernel_device() != "cpu",
                              reason="emulates the GPU's rounding in Triton's interpreter; compiled runs have the real one")
# found on an H200 (dq at 1.02 of the same-precision allowance with tf32x3 backward products)
PINNED = "bandwidth:lam=1,scale=100:B=1,H=1,S=33,D=16,dtype=float32,seed=0"


def _check(name="triton"):
    import dataclasses

    from lla_verify.budget.backward import check_backward
    from lla_verify.registry.cases import parse_case
    from lla_verify.registry.impls import get_impl
    from lla_verify.testing.tensor_cores import tensor_core_rounding

    with tensor_core_rounding():
        # a planted variant is recorded under its own name (the closing ledger keeps it apart)
        return check_backward(parse_case(PINNED).build("cpu"), dataclasses.replace(get_impl("triton"), name=name))


@pytest.mark.interp
@CPU_ONLY
def test_fp32_backward_within_budget_with_the_gpus_product_rounding():
    verdict = _check()
    assert verdict.passed, verdict.message


@pytest.mark.interp
@CPU_ONLY
def test_tf32x3_backward_products_fail_that_budget(monkeypatch):
    """The emulation bites: the backward with tf32x3 products (what fp32 inputs get without
    _common.backward_product_precision) fails the same check, on dq."""
    import lla_triton.backward as bwd

    monkeypatch.setattr(bwd, "backward_product_precision", lambda dtype, precision: precision)
    verdict = _check("planted:tf32x3-backward")
    assert not verdict.passed and verdict.summary.get("worst_tensor") == "dq", verdict.message


def test_install_is_idempotent_and_undone():
    """Nested blocks: the inner one leaves the outer one's patch; the outer one restores the
    interpreter's own dot."""
    from triton.runtime import interpreter

    from lla_verify.testing import tensor_cores

    exact = interpreter.InterpreterBuilder.create_dot
    with tensor_cores.tensor_core_rounding():
        patched = interpreter.InterpreterBuilder.create_dot
        assert patched is not exact
        with tensor_cores.tensor_core_rounding():
            pass
        assert interpreter.InterpreterBuilder.create_dot is patched
    assert interpreter.InterpreterBuilder.create_dot is exact
    assert tensor_cores._ORIGINAL is None


def test_the_suite_option_installs_it(tmp_path):
    """`pytest --lla-tensor-cores` under the interpreter runs the tests with the rounding on."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_probe.py").write_text(
        "from lla_verify.testing import tensor_cores\n\n"
        "def test_on():\n    assert tensor_cores._ORIGINAL is not None\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "lla_verify.testing.pytest_plugin", "-q", "-p", "no:cacheprovider", "--lla-tensor-cores",
                          str(tmp_path / "test_probe.py")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    off = subprocess.run([sys.executable, "-m", "pytest", "-p", "lla_verify.testing.pytest_plugin", "-q", "-p", "no:cacheprovider", "--lla-device", "cpu",
                          str(tmp_path / "test_probe.py")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert off.returncode == 1, off.stdout + off.stderr
