"""The installed wheel runs the property suite outside the repository.

The wheel is built from a copy of the source tree, installed into a fresh virtual
environment in a temporary folder, and the suite is run from another temporary folder
against an implementation defined there, through ``pytest --pyargs`` (under xdist,
whose workers load the plugin from the entry point) and through ``lla-verify suite``.
The fresh environment reaches torch, pytest and the rest through a .pth file naming
this interpreter's site-packages folders, placed after its own: those folders'
.pth files (the editable install of this checkout among them) are not run, so the
checkout is not importable there and the wheel's code is what runs; the test asserts
it from the module paths.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# A user's implementation: the dense fp32 reference behind the protocol, and a copy
# off by one part in a hundred, which the suite must fail.
IMPL_MODULE = '''
from lla_verify.oracles.dense import dense_torch_lla


def fn(q, k, v, *, ridge_lambda, qk_scale=None):
    return dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)


def off_by_a_percent(q, k, v, *, ridge_lambda, qk_scale=None):
    return 1.01 * dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)
'''

PROBE = '''
import importlib.metadata, lla_verify, lla_verify.testing.pytest_plugin, lla_verify_properties
eps = [ep.value for ep in importlib.metadata.entry_points(group="pytest11")]
print(lla_verify.__file__); print(lla_verify.testing.pytest_plugin.__file__); print(lla_verify_properties.__file__)
print("entry point:", "lla_verify.testing.pytest_plugin" in eps)
'''


def _run(cmd, cwd, env, timeout=300):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _outcomes(out: str) -> dict:
    """pytest's closing line, '3 passed, 1 failed in 2.0s' -> {'passed': 3, 'failed': 1}."""
    last = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)]
    assert last, f"no pytest outcome line in:\n{out}"
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", last[-1])}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin folder, a work folder holding usermod.py, the environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    for part in ("lla_verify", "properties", "kernels/lla_contract", "kernels/lla_triton", "kernels/parallax_triton",
                 "kernels/lla_decode", "kernels/parallax_decode"):
        shutil.copytree(ROOT / part, src / part, ignore=skip)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)

    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith(("PYTEST_", "LLA_", "CUDA_VISIBLE"))}
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "--disable-pip-version-check", "-w", tmp / "dist", src], cwd=tmp, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("lla_verify-*.whl")

    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    assert made.returncode == 0, made.stderr
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    inst = _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index",
                 "--disable-pip-version-check", wheel], cwd=tmp, env=env)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    own = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp, env=env).stdout.strip())
    deps = [p for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (own / "zz_lla_test_deps.pth").write_text("".join(p + "\n" for p in deps))

    work = tmp / "work"
    work.mkdir()
    (work / "usermod.py").write_text(IMPL_MODULE)
    return py, bindir, work, env, own


def test_wheel_code_is_what_runs(installed):
    py, _, work, env, own = installed
    r = _run([py, "-c", PROBE], cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    *files, ep = r.stdout.strip().splitlines()
    for f in files:  # lla_verify, its plugin and the suite, each from the wheel
        assert Path(f).resolve().is_relative_to(own.resolve()), (f, own)
    assert ep == "entry point: True"


def test_wheel_holds_every_package(installed):
    """pyproject lists the packages by name: a subpackage left off the list would be
    missing from the wheel while the source tree still imports it."""
    *_, own = installed
    for top, src in (("lla_verify", ROOT / "lla_verify"), ("lla_contract", ROOT / "kernels" / "lla_contract"),
                     ("lla_triton", ROOT / "kernels" / "lla_triton"),
                     ("parallax_triton", ROOT / "kernels" / "parallax_triton"),
                     ("lla_decode", ROOT / "kernels" / "lla_decode"),
                     ("parallax_decode", ROOT / "kernels" / "parallax_decode")):
        want = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "__pycache__" not in p.parts)
        got = sorted(str(p.relative_to(own / top)) for p in (own / top).rglob("*.py") if "__pycache__" not in p.parts)
        assert got == want, (top, sorted(set(want) - set(got)))


def test_suite_passes_from_another_folder_under_xdist(installed):
    """The plugin comes from the entry point alone (no conftest here), in the controller
    and in both workers: the closing ledger line counts the workers' checks."""
    py, _, work, env, _ = installed
    r = _run([py, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs", "lla_verify_properties",
              "--lla-impl", "usermod:fn", "--lla-device", "cpu", "--hypothesis-profile", "ci",
              # the LLA forward's pinned cases only: the other operators' regressions run on
              # their own default kernels, not on --lla-impl, so they would not count below
              "-n", "2", "-k", "pinned_regressions and not gradients and not operator"], cwd=work, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    got = _outcomes(out)
    assert got.get("passed", 0) > 0 and not got.get("failed") and not got.get("error") and not got.get("errors"), out
    m = re.search(r"lla-verify: usermod:fn: 0 of (\d+) checks over threshold", out)
    assert m and int(m.group(1)) == got["passed"], out


def test_cli_front_runs_the_installed_suite(installed):
    _, bindir, work, env, _ = installed
    front = bindir / "lla-verify"
    quick = ["--", "-p", "no:cacheprovider", "--hypothesis-profile", "ci", "-k", "pinned_regressions and spectrum"]

    good = _run([front, "suite", "--impl", "usermod:fn", "--device", "cpu", *quick], cwd=work, env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert _outcomes(good.stdout)["passed"] > 0

    bad = _run([front, "suite", "--impl", "usermod:off_by_a_percent", "--device", "cpu", *quick], cwd=work, env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert _outcomes(bad.stdout).get("failed", 0) > 0

    none = _run([front, "suite", "--impl", "usermod:fn", "--device", "cpu", "--", "-p", "no:cacheprovider",
                 "-k", "no_such_property"], cwd=work, env=env)
    assert none.returncode == 5, none.stdout + none.stderr

    unknown = _run([front, "suite", "--impl", "usermod:nothing"], cwd=work, env=env)
    assert unknown.returncode == 2 and "usermod" in unknown.stderr and "nothing" in unknown.stderr, unknown.stderr

    usage = _run([front, "suite", "--impl", "usermod:fn", "--", "--no-such-pytest-option"], cwd=work, env=env)
    assert usage.returncode == 2, usage.stdout + usage.stderr
