"""scripts/flashlla_emulate.py re-derives the public kernel's forward arithmetic. Its
findings (docs/findings/flashlla.md #8) stand only if, without the bf16 steps and with
CG run to convergence, it is LLA itself, and if its bf16 steps are applied."""

from __future__ import annotations

import pytest
import torch

from lla_verify.oracles.float64 import lla_forward
from tests import repo_scripts


@pytest.fixture(scope="module")
def emu():
    return repo_scripts.load("flashlla_emulate")


def _inputs(S=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(S, D, generator=g).to(torch.bfloat16) for _ in range(3)]


def test_without_its_roundings_it_is_lla(emu):
    q, k, v = _inputs()
    ref = lla_forward(q.double(), k.double(), v.double(), ridge_lambda=0.5)
    o = emu.emulate_forward(q, k, v, 0.5, cg_iters=64, roundings=False).double()
    # fp32 arithmetic on a well-conditioned problem (lambda 0.5): a wrong formula is off by O(1)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)


def test_its_bf16_steps_are_applied(emu):
    q, k, v = _inputs()
    ref = lla_forward(q.double(), k.double(), v.double(), ridge_lambda=0.5)
    exact = emu.emulate_forward(q, k, v, 0.5, cg_iters=64, roundings=False).double()
    rounded = emu.emulate_forward(q, k, v, 0.5, cg_iters=64, roundings=True).double()
    # bf16 weights and rho move the output by far more than fp32 does: at least 2^-9 relative
    assert float((rounded - ref).norm() / ref.norm()) > 2.0 ** -9 > 10 * float((exact - ref).norm() / ref.norm())


def test_bad_shapes_are_refused_by_name(emu):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="q, k, v"):
        emu.emulate_forward(q[None], k, v, 0.1)


@pytest.mark.parametrize("argv, match", [
    (["--shape", "2,3"], "--shape"),
    (["--shape", "0,4,4"], "--shape"),
    (["--device", "tpu"], "--device"),
    (["--compare-public"], "--compare-public"),
])
def test_bad_arguments_exit_2_naming_the_argument(emu, capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        emu.main(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_the_harness_fails_the_public_arithmetic_on_every_pinned_case(emu):
    """Detection power on an algorithm nobody here wrote, without a GPU: the public
    forward's arithmetic (emulated) fails the forward verdict on every pinned LLA case its
    record accepts, as the public kernel does on the GPU (docs/findings/flashlla.md #8)."""
    from lla_verify.budget.forward import check_forward
    from lla_verify.testing.regressions import pinned
    from lla_verify.testing.suite import unsupported

    impl = emu.emulated_record()
    judged = 0
    for case in pinned("lla"):
        p = case.build("cpu")
        if unsupported(impl, p):
            continue
        verdict = check_forward(p, impl, impl.forward(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale))
        assert not verdict.passed and verdict.ratio > 1.0, f"{case.spec()}: ratio {verdict.ratio:.3g}"
        judged += 1
    assert judged >= 10, judged


def test_the_suite_fails_the_public_arithmetic_for_its_defects_only(tmp_path):
    """A CPU dry run of the GPU job: the forward property files against the emulation
    (--lla-impl flashlla_emulate:emulated_lla), judged by the job's own check as a part.
    The check must find forward failures and nothing that is the harness's (an error, an
    Unsatisfiable property, a skip the record does not name); the score-shift identity,
    which judges nothing when its shifted inputs do not round exactly, must be among the
    failures."""
    import os
    import subprocess
    import sys

    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    xml = tmp_path / "junit.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "kernels"), str(repo / "scripts"),
                                          os.environ.get("PYTHONPATH", "")])}
    files = ["properties/test_forward_accuracy.py", "properties/test_identities.py", "properties/test_limits.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--hypothesis-profile",
                          "triage", "--lla-impl", "flashlla_emulate:emulated_lla", "--lla-device", "cpu",
                          f"--junitxml={xml}", *files], capture_output=True, text=True, env=env, cwd=repo, timeout=900)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-2000:]
    check = subprocess.run([sys.executable, "scripts/flashlla_suite_check.py", str(xml), "--part", "--pytest-rc", "1",
                            "--impl", "flashlla_emulate:emulated_lla"], capture_output=True, text=True, env=env,
                           cwd=repo, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-2000:]
    first = check.stdout.splitlines()[0]
    assert "0 harness errors" in first and "0 other skips" in first and " 0 forward failures" not in first, first
    assert "test_shift_invariance_of_scores" in check.stdout, check.stdout[-3000:]
