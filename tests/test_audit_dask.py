"""lla-verify audit --dask: the cells as tasks on a local Dask cluster of CPU workers.

The report of a Dask run must be the one-process report of the same plan, cell for
cell, bit for bit, apart from the fields that say when and where it ran (named below);
a cell whose worker dies is retried once, and a cell that fails twice is a failed cell
with its reason. One cluster of 2 worker processes (1 thread each) serves the module:
the cells' child processes stay warm between tests, which keeps the file's time small.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys

import pytest

from lla_verify.audit.on_dask import comparable
from lla_verify.cli import main

HAVE_DASK = all(importlib.util.find_spec(m) is not None for m in ("dask", "distributed"))
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="dask and distributed are not installed (the optional extra: "
                                                      "pip install 'lla-verify[dask]'; make setup installs it)")

# Eight quick cells (torch-fp32, CPU): float32 with gradients checked and bfloat16
# without, per-query lambda, B = 2 and H = 3, D = 32 (whose gradient ratio moves with the
# thread count), a kappa 1e6 spectrum.
ONLY = ["--only", "gaussian:lam=0.1:", "--only", "lambda_decades:decades=2", "--only", "S=17,", "--only", "S=31,",
        "--only", "kappa=1e+06,rotate=1:B=1,H=1,S=48,D=16,dtype=float32"]
AUDIT = ["audit", "--impl", "torch-fp32", "--no-progress", *ONLY]
# What two runs of one plan may differ in, and nothing else: per cell the implementation's
# time and which Dask worker ran it; in meta the date, the wall time, the command line
# (it names --dask) and the cluster.


def _run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@contextlib.contextmanager
def _deadline(seconds: int):
    """A run that does not end in time fails the test (never a CI run that hangs)."""
    def expired(signum, frame):
        raise TimeoutError(f"the Dask audit did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """The address of an embedded cluster (on_dask.session, as a bare --dask starts it) of 2 CPU workers."""
    from lla_verify.audit.on_dask import session

    markers = tmp_path_factory.mktemp("planted-markers")
    # distributed's nanny writes its workers' thread settings into this process's environment
    # too; later tests in this process get the environment they had
    saved = dict(os.environ)
    os.environ["LLA_PLANTED_MARKERS"] = str(markers)  # read by tests.trust_planted:dask_mixed on the workers
    try:
        with session(None, "cpu", 2) as (client, info):
            assert info["embedded"] and len(client.scheduler_info()["workers"]) == 2
            yield info["scheduler"], markers, info["worker_env"][0]
    finally:
        os.environ.clear()
        os.environ.update(saved)


@needs_dask
def test_dask_report_equals_the_one_process_report(scheduler, tmp_path, capsys, monkeypatch):
    address, _, worker_env = scheduler
    one, dask = tmp_path / "one", tmp_path / "dask"
    # the thread counts move the last bits of some reductions (on the quick plan, 2 threads
    # against 1 changed a gradient ratio at 1e-11): the one-process run's cell child gets the
    # workers' thread settings, and then every number must agree exactly
    for name, value in worker_env.items():
        monkeypatch.setenv(name, value)
    rc1, out1, err1 = _run([*AUDIT, "--cells", "1:", "--out", str(one)], capsys)
    with _deadline(240):
        rc2, out2, err2 = _run([*AUDIT, "--cells", "1:", "--out", str(dask), "--dask", address], capsys)
    assert rc1 == 0 and rc2 == 0, out1 + err1 + out2 + err2
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, dask))
    assert len(a["cells"]) == 7 and sum(c["grad"]["status"] == "checked" for c in a["cells"]) == 4
    assert all(0 < c["ratio"] < 1 for c in a["cells"])
    # the excluded fields are there, and are what they say
    assert all("dask" not in c for c in a["cells"]) and "dask" not in a["meta"]
    assert {c["dask"]["worker"] for c in b["cells"]} <= {"0", "1"} and b["meta"]["dask"]["scheduler"] == address
    assert f"--dask {address}" in b["meta"]["command"]
    sa, sb = comparable(a), comparable(b)
    assert set(sa) == set(sb) and set(sa["meta"]) == set(sb["meta"])
    for ca, cb in zip(sa["cells"], sb["cells"]):
        assert ca == cb, ca["spec"]  # every number bit for bit: JSON floats read back exactly
    assert sa == sb
    assert b["meta"]["cell_indices"] == list(range(1, 8)) and b["meta"]["cells_slice"] == "1:"

    # the missing slice on Dask, and --merge makes them the whole audit
    with _deadline(120):
        rc3, _, err3 = _run([*AUDIT, "--cells", ":1", "--out", str(tmp_path / "first"), "--dask", address], capsys)
    assert rc3 == 0, err3
    rc4, out4, _ = _run(["audit", "--merge", str(tmp_path / "first/report.json"), str(dask / "report.json"),
                         "--out", str(tmp_path / "merged")], capsys)
    merged = json.loads((tmp_path / "merged/report.json").read_text())
    assert rc4 == 0 and out4.startswith("PASS: 0 out of 8 cells"), out4
    assert merged["verdict"]["interrupted"] is None and len(merged["cells"]) == 8


@needs_dask
def test_operator_cells_on_dask_equal_the_one_process_report(scheduler, tmp_path, capsys, monkeypatch):
    # each worker resolves each operator's implementation by (operator, name) and runs its cells
    address, _, worker_env = scheduler
    for name, value in worker_env.items():
        monkeypatch.setenv(name, value)
    argv = ["audit", "--ops", "parallax,lla-decode,parallax-decode", "--parallax-impl", "parallax-oracle",
            "--decode-impl", "lla-decode-oracle", "--parallax-decode-impl", "lla_verify.testing.mutants:pxdec_dropped_nu",
            "--no-progress", "--only", "S=1,", "--only", "S=7,"]
    rc1, out1, err1 = _run([*argv, "--out", str(tmp_path / "one")], capsys)
    with _deadline(240):
        rc2, out2, err2 = _run([*argv, "--out", str(tmp_path / "dask"), "--dask", address], capsys)
    assert rc1 == rc2 == 1, out1 + err1 + out2 + err2  # the planted Parallax decode bug fails its cells
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "dask"))
    assert [c["op"] for c in a["cells"]] == [c["op"] for c in b["cells"]]
    assert {c["op"] for c in a["cells"]} == {"parallax", "lla-decode", "parallax-decode"}
    assert {c["op"] for c in b["cells"] if not c["passed"]} == {"parallax-decode"}
    assert comparable(a) == comparable(b)


@needs_dask
def test_a_dying_worker_is_retried_once_then_the_cell_fails_with_its_reason(scheduler, tmp_path, capsys):
    address, markers, _ = scheduler
    planted = ["audit", "--impl", "tests.trust_planted:dask_mixed", "--no-progress", "--no-backward",
               "--dask", address]
    # kills its worker on the first try only: retried on another worker, where it passes;
    # os._exit inside the cell's child process: the trust boundary fails the cell, the worker stands
    with _deadline(240):
        rc, out, err = _run([*planted, "--only", "kappa=1e+06,rotate=1:B=1,H=1,S=48,D=16,dtype=float32",
                             "--only", "gaussian:lam=0.1:B=1,H=1,S=40,D=16,dtype=bfloat16",
                             "--out", str(tmp_path / "a")], capsys)
    cells = {c["S"]: c for c in json.loads((tmp_path / "a/report.json").read_text())["cells"]}
    assert rc == 1 and set(cells) == {48, 40} and "FAIL: 1 out of 2 cells" in out, out + err
    assert (markers / "killed-S48").exists()
    assert cells[48]["passed"] and cells[48]["ratio"] < 1, cells[48]["message"]
    assert not cells[40]["passed"] and "called os._exit(0)" in cells[40]["message"], cells[40]["message"]
    # kills its worker on every try: after one retry, a failed cell that says why
    with _deadline(240):
        rc, out, err = _run([*planted, "--only", "gaussian:lam=0.1:B=1,H=1,S=40,D=16,dtype=float32",
                             "--out", str(tmp_path / "b")], capsys)
    (killed,) = json.loads((tmp_path / "b/report.json").read_text())["cells"]
    assert rc == 1 and "FAIL: 1 out of 1 cells" in out, out + err
    assert not killed["passed"] and killed["ratio"] == "inf" and killed["cause"] == "implementation"
    assert "Dask worker running the cell died" in killed["message"] and "KilledWorker" in killed["message"]


def test_dask_without_the_package_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import distributed` sees when it is missing
    rc, out, err = _run([*AUDIT, "--out", str(tmp_path / "r"), "--dask"], capsys)
    assert rc == 2, out + err
    assert "--dask: needs the package 'distributed'" in err and "pip install 'lla-verify[dask]'" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--dask-workers", "2"], "--dask-workers: sizes the embedded cluster of a bare --dask"),
    (["--dask", "tcp://127.0.0.1:1", "--dask-workers", "2"], "--dask-workers: sizes the embedded cluster"),
    (["--dask", "--dask-workers", "0"], "--dask-workers: must be >= 1, got 0"),
])
def test_dask_option_errors(argv, needle, tmp_path, capsys):
    rc, out, err = _run([*AUDIT, "--out", str(tmp_path / "r"), *argv], capsys)
    assert rc == 2 and needle in err, out + err


def test_worker_environments():
    from lla_verify.audit.on_dask import worker_envs
    from lla_verify.cliutil import UsageError

    cpu = worker_envs("cpu", 2, cpus=16)
    assert cpu == [{"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "OPENBLAS_NUM_THREADS": "8"}] * 2
    assert len(worker_envs("cpu", cpus=4)) == 4  # one per CPU by default
    gpu = worker_envs("cuda", cpus=16, gpus=["3", "5"])  # one per visible GPU, pinned to it
    assert [e["CUDA_VISIBLE_DEVICES"] for e in gpu] == ["3", "5"] and gpu[0]["OMP_NUM_THREADS"] == "8"
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_envs("cuda", 3, cpus=16, gpus=["3", "5"])] == ["3", "5", "3"]
    with pytest.raises(UsageError, match="no GPU is visible"):
        worker_envs("cuda", cpus=16, gpus=[])
    with pytest.raises(UsageError, match="--device cuda:1: each worker gets its own GPU"):
        worker_envs("cuda:1", cpus=16, gpus=["0", "1"])
