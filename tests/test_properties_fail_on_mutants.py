"""Properties that once could not fail, run against a planted bug (lla_verify/testing/mutants.py)
that each of them must now catch; the mutant-free control passes the same command.

Each runs one property of properties/ in a fresh pytest process under the ci profile,
with ``--lla-impl lla_verify.testing.mutants:NAME`` on the CPU: the property suite's own
options and fixtures, exactly as the kill list (docs/kill-list.md) runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def _run_property(node: str, impl: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
           "--hypothesis-profile", "ci", "--lla-device", "cpu", "--lla-impl", impl, *extra, node]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _assert_fails(out: subprocess.CompletedProcess, what: str):
    assert out.returncode == 1 and " failed" in out.stdout, (
        f"{what}: expected a failing property, got exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")


def _assert_passes(out: subprocess.CompletedProcess, what: str):
    assert out.returncode == 0 and " failed" not in out.stdout, (
        f"{what}: expected a pass, got exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")


PINNED_D16 = ("properties/test_forward_accuracy.py::test_forward_pinned_regressions"
              "[gaussian:lam=0.001:B=1,H=1,S=17,D=16,dtype=bfloat16,seed=1]")


def test_pinned_regression_runs_at_its_own_head_dim():
    """A pinned D = 16 case used to run at D = 8 on CPU for an implementation without
    head-dim limits, where head_dim_block_8 (channels beyond 8 unseen) is exact."""
    _assert_fails(_run_property(PINNED_D16, "lla_verify.testing.mutants:head_dim_block_8"), "head_dim_block_8")
    _assert_passes(_run_property(PINNED_D16, "torch-fp32"), "torch-fp32 control")


# Each Parallax planted bug (lla_verify/testing/mutants.py, PARALLAX_MUTANTS) against one
# property of properties/test_parallax.py that kills it (docs/kill-list.md lists them all);
# the same properties pass the dense reference.
PARALLAX_KILLS = {
    "px_uncentred": "properties/test_parallax.py::test_parallax_meets_the_same_precision_target",
    "px_unnormalised_probe": "properties/test_parallax.py::test_parallax_within_budget[gaussian-random]",
    "px_dropped_nu": "properties/test_parallax.py::test_zero_probe_is_softmax_attention",
    "px_unmasked_correction": "properties/test_parallax.py::test_causality_bitwise",
}


def test_parallax_mutants_are_killed_and_the_reference_passes():
    for name, node in PARALLAX_KILLS.items():
        _assert_fails(_run_property(node, "torch-fp32", "--lla-parallax-impl", f"lla_verify.testing.mutants:{name}"),
                      name)
    nodes = sorted(set(PARALLAX_KILLS.values()))
    _assert_passes(_run_property(nodes[0], "torch-fp32", *nodes[1:]), "parallax-dense control")
