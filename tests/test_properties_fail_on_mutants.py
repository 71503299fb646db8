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
from concurrent.futures import ThreadPoolExecutor
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

# Each LLA planted bug (lla_verify/testing/mutants.py, MUTANTS) against one property that
# kills it for the planted reason (docs/kill-list.md lists them all). The mutants are the
# dense reference with one step changed, and ``mutants.control`` is the same assembly
# without a bug: it must pass the same properties, or a kill would be the shared code's.
# head_dim_block_8's pin is D = 16: a pinned case used to run at D = 8 on CPU for an
# implementation without head-dim limits, where channels beyond 8 unseen is exact.
LLA_KILLS = {
    "off_by_one_mask": "properties/test_identities.py::test_causality_bitwise",
    "lambda_not_scaled_by_omega": "properties/test_limits.py::test_large_lambda_is_softmax_with_rate",
    "dropped_partial_tile": "properties/test_identities.py::test_linear_values_reproduced_at_lambda_zero",
    "bias_01pct": "properties/test_identities.py::test_partition_of_unity",
    "per_query_lambda_ignored": "properties/test_forward_accuracy.py::test_forward_within_budget[lambda_decades]",
    "no_max_subtraction": "properties/test_forward_accuracy.py::test_no_nonfinite_output_when_lambda_positive",
    "rho_rounded_to_bf16": "properties/test_forward_accuracy.py::test_forward_within_budget[gaussian]",
    "cg_two_short": "properties/test_forward_accuracy.py::test_forward_within_budget[spectrum]",
    "head_dim_block_8": PINNED_D16,
    "dk_last_key_scaled": "properties/test_gradients.py::test_gradients_within_budget[gaussian]",
}


def test_lla_mutants_are_killed_and_the_control_passes():
    from lla_verify.testing import mutants

    assert {getattr(mutants, n) for n in LLA_KILLS} == set(mutants.MUTANTS.values()), "a mutant without a kill here"
    # triage: ci's derandomized examples without the shrinking, which only makes the
    # failure's example smaller and took 21 of the 25 s of a kill; a failure here is one
    # ci would report too (the same generate phase). Two at a time: the pytest start-up
    # of each is most of its time.
    nodes = sorted(set(LLA_KILLS.values()))
    with ThreadPoolExecutor(2) as pool:
        control = pool.submit(_run_property, nodes[0], "lla_verify.testing.mutants:control", *nodes[1:])
        runs = {name: pool.submit(_run_property, node, f"lla_verify.testing.mutants:{name}",
                                  "--hypothesis-profile", "triage") for name, node in LLA_KILLS.items()}
    for name, run in runs.items():
        _assert_fails(run.result(), name)
    _assert_passes(control.result(), "LLA control")


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


# Each decode planted bug (mutants.DECODE_MUTANTS, PARALLAX_DECODE_MUTANTS) against one
# property of properties/test_decode.py that kills it, with --lla-decode-impl and
# --lla-parallax-decode-impl; the controls (a split combine with its rescale, the same
# code as the split-combine mutants) pass every one of those properties.
DECODE = "properties/test_decode.py::"
DECODE_KILLS = {
    "dec_off_by_one_length": DECODE + "test_lla_decode_is_the_forward_row",
    "dec_stale_length": DECODE + "test_ragged_batch_lla_decode",
    "dec_unscaled_split_combine": DECODE + "test_lla_decode_is_the_forward_row",
}
PARALLAX_DECODE_KILLS = {
    "pxdec_off_by_one_length": DECODE + "test_token_by_token_parallax_decode",
    "pxdec_stale_length": DECODE + "test_ragged_batch_parallax_decode",
    "pxdec_dropped_nu": DECODE + "test_parallax_decode_is_the_forward_row",
    "pxdec_unscaled_split_combine": DECODE + "test_parallax_decode_is_the_forward_row",
}
DECODE_CONTROLS = ("--lla-decode-impl", "lla_verify.testing.mutants:dec_split_control",
                   "--lla-parallax-decode-impl", "lla_verify.testing.mutants:pxdec_split_control")


def test_decode_mutants_are_killed_and_the_controls_pass():
    from lla_verify.testing import mutants

    assert set(DECODE_KILLS) == set(mutants.DECODE_MUTANTS), "an LLA decode mutant without a kill here"
    assert set(PARALLAX_DECODE_KILLS) == set(mutants.PARALLAX_DECODE_MUTANTS), "a Parallax decode mutant without one"
    M = "lla_verify.testing.mutants:"
    with ThreadPoolExecutor(2) as pool:
        runs = {name: pool.submit(_run_property, node, "torch-fp32", "--hypothesis-profile", "triage",
                                  *DECODE_CONTROLS, "--lla-decode-impl", M + name)
                for name, node in DECODE_KILLS.items()}
        runs.update({name: pool.submit(_run_property, node, "torch-fp32", "--hypothesis-profile", "triage",
                                       *DECODE_CONTROLS, "--lla-parallax-decode-impl", M + name)
                     for name, node in PARALLAX_DECODE_KILLS.items()})
        nodes = sorted(set(DECODE_KILLS.values()) | set(PARALLAX_DECODE_KILLS.values()))
        control = pool.submit(_run_property, nodes[0], "torch-fp32", *DECODE_CONTROLS, *nodes[1:])
    for name, run in runs.items():
        _assert_fails(run.result(), name)
    _assert_passes(control.result(), "decode controls")


def test_dv_sum_names_a_nonfinite_dv_and_takes_its_budget_from_the_oracle():
    """A NaN dv (the public kernel's #7) fails the dv-sum property by name; its allowance
    is the problem's, so the NaN cannot make it "nan > nan"."""
    node = "properties/test_gradients.py::test_dv_sums_to_total_cotangent"
    out = _run_property(node, "tests.trust_planted:dv_nan_last_value", "--hypothesis-profile", "triage")
    _assert_fails(out, "dv_nan_last_value")
    assert "non-finite entries" in out.stdout and "allowed nan" not in out.stdout, out.stdout[-3000:]
    _assert_passes(_run_property(node, "tests.trust_planted:honest"), "honest dense reference")


def test_score_shift_invariance_catches_a_missing_max_subtraction():
    """The identity judges a draw only on shifted inputs that round exactly, which
    suite.score_shift builds; with inputs that round (t = sqrt(200 / s)) it judges none and
    passes this mutant (docs/kill-list.md)."""
    node = "properties/test_identities.py::test_shift_invariance_of_scores"
    out = _run_property(node, "lla_verify.testing.mutants:no_max_subtraction", "--hypothesis-profile", "triage")
    _assert_fails(out, "no_max_subtraction")
    assert "non-finite output after a per-row score shift" in out.stdout, out.stdout[-3000:]


def test_decode_properties_name_a_bad_impl_and_why_a_package_kernel_cannot_run():
    node = DECODE + "test_lla_decode_is_the_forward_row"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "--lla-device", "cpu", node]
    bad = subprocess.run(base + ["--lla-decode-impl", "no-such-decode"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 4 and "--lla-decode-impl" in bad.stderr + bad.stdout, bad.stdout[-2000:] + bad.stderr
    # the package's kernels on CPU need the interpreter: a skip that says so, not a crash
    # and not a silent switch of the process to the interpreter
    out = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "1 skipped" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout[-2000:]


# decode implementations that break the calling contract (tests/test_operators.py): the
# decode properties fail each, naming what it did, as check and the audit do
MISBEHAVING_DECODES = [
    ("--lla-decode-impl", "dec_mutates_lengths", "test_lla_decode_is_the_forward_row", "modified its inputs: lengths"),
    ("--lla-decode-impl", "dec_returns_list", "test_ragged_batch_lla_decode", "returned list"),
    ("--lla-parallax-decode-impl", "pxdec_raises", "test_token_by_token_parallax_decode", "kernel launch failed"),
    ("--lla-parallax-decode-impl", "pxdec_hangs", "test_parallax_decode_is_the_forward_row", "timed out"),
]


def test_decode_properties_fail_an_implementation_that_breaks_the_contract():
    def run(opt, name, prop):
        return _run_property(DECODE + prop, "torch-fp32", "--hypothesis-profile", "triage", "--lla-call-timeout", "3",
                             *DECODE_CONTROLS, opt, f"tests.test_operators:{name}")

    with ThreadPoolExecutor(2) as pool:
        runs = [(name, words, pool.submit(run, opt, name, prop)) for opt, name, prop, words in MISBEHAVING_DECODES]
    for name, words, fut in runs:
        out = fut.result()
        _assert_fails(out, name)
        assert words in out.stdout, f"{name}: the failure does not say {words!r}\n{out.stdout[-3000:]}"
