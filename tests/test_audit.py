"""The release audit (lla_verify/audit/, lla-verify audit and check) and its report: verdicts, a planted bug, baselines, exit codes.

CPU only, torch-fp32 and tiny cell subsets (``--only`` / ``--max-cells`` on the
command line, explicit cell lists through ``run_audit``), so each test takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
import math
import os
import shlex
import subprocess
import sys

import pytest
import torch

from lla_verify.audit import plan as audit_plan
from lla_verify.audit import baseline as audit_baseline
from lla_verify.audit import run as audit_run
from lla_verify.commands import audit as cmd_audit
from lla_verify.registry.cases import Case
from lla_verify.cli import main
from lla_verify.testing.kept_worker import kept_workers
from lla_verify.cliutil import UsageError
from lla_verify.registry.impls import Impl, get_impl
from lla_verify.oracles.dense import dense_torch_lla
from lla_contract import check_lambda, check_scale

# Well-conditioned cells (kappa(Sigma_i) at most ~1e3): every honest fp32
# implementation is far inside budget here, so a failure is the implementation's.
EASY = [
    Case("gaussian", {"lam": 1.0}, S=33, D=8),
    Case("gaussian", {"lam": 10.0}, S=24, D=8, dtype="bfloat16"),
    Case("spectrum", {"kappa": 100.0, "rotate": 1}, S=20, D=8),
    Case("bandwidth", {"scale": 1e-2, "lam": 1.0}, S=17, D=8),
]
ONLY = ["--only", "gaussian:lam=0.1:B=1,H=1,S=40", "--only", "kappa=100,rotate=1:B=1,H=1,S=48,D=16,dtype=float32"]


def omega_dropped_lla(q, k, v, *, ridge_lambda, qk_scale=None):
    """The planted bug: Sigma_i = scatter + lambda I, the omega_i factor on the ridge forgotten.

    Written as dense_torch_lla with lambda_i replaced by lambda_i / omega_i, so the
    only difference from the reference is the missing factor.
    """
    scale = check_scale(qk_scale, q.shape[-1])
    S = q.shape[-2]
    a = scale * (q.float() @ k.float().transpose(-1, -2))
    a = a.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    omega = torch.exp(a - a.amax(-1, keepdim=True)).sum(-1)
    lam = check_lambda(ridge_lambda, tuple(q.shape[:-1]), q.device, dtype=torch.float32)
    return dense_torch_lla(q, k, v, ridge_lambda=lam / omega, qk_scale=qk_scale)


def _cells(cases):
    return [audit_plan.Cell("test", c) for c in cases]


@pytest.fixture
def one_child():
    """Tests that run several isolated audits or checks: one kept Worker child serves them
    all instead of a spawn per command (lla_verify/testing/kept_worker.py)."""
    with kept_workers():
        yield


def _run_cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_reference_passes_and_writes_both_reports(tmp_path, capsys):
    rc, out, err = _run_cli(["audit", "--impl", "torch-fp32", "--out", str(tmp_path), "--no-progress", *ONLY], capsys)
    assert rc == 0, out + err
    assert out.startswith("PASS: 0 out of")
    rep = json.loads((tmp_path / "report.json").read_text())
    assert {"schema", "meta", "verdict", "regressions", "cells", "skipped"} <= set(rep)
    assert rep["meta"]["impl"] == "torch-fp32" and rep["meta"]["device"] == "cpu"
    assert {"torch", "python"} <= set(rep["meta"]["versions"]) and rep["meta"]["command"].startswith("lla-verify audit")
    assert rep["verdict"]["passed"] and rep["verdict"]["n_cells"] == len(rep["cells"]) >= 3
    for c in rep["cells"]:
        for key in ("spec", "ratio", "passed", "cause", "err_max", "kappa_max", "kappa_worst", "n_nan", "n_inf",
                    "time_s", "command", "grad"):
            assert key in c, key
        assert c["command"].startswith("lla-verify check --case ")
        assert c["grad"]["status"] == "checked" or c["grad"]["status"].startswith("not checked")
    html = (tmp_path / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") >= 2
    assert html.index("PASS") < html.index("<h2>")  # the verdict comes first


def test_planted_omega_bug_fails_with_implementation_attribution(tmp_path):
    bug = Impl(name="omega-dropped", forward=omega_dropped_lla, description="planted bug: ridge lambda I")
    res = audit_run.run_audit(bug, _cells(EASY), out=str(tmp_path), backward=False)
    assert res.exit_code == 1
    v = res.report["verdict"]
    assert v["n_failed"] == len(EASY), [c["ratio"] for c in res.report["cells"]]
    assert all(c["cause"] == "implementation" for c in res.report["cells"])
    assert all(c["ratio"] > 10 for c in res.report["cells"])
    html = (tmp_path / "report.html").read_text()
    assert "FAIL" in html and "implementation" in html and "lla-verify check --case" in html


@pytest.mark.usefixtures("sigint_as_a_shell_gives_it")
def test_interrupted_audit_writes_a_partial_report_that_fails(tmp_path):
    # a scheduler's timeout or Ctrl-C mid-sweep: the finished cells are kept, marked partial.
    # The interrupt is a real SIGINT (one the implementation raises itself is its failure,
    # tests/test_trust.py); a closure, so the cells run in this process and receive it.
    import signal

    calls = []

    def stops_on_second_call(q, k, v, *, ridge_lambda, qk_scale=None):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return dense_torch_lla(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale)

    impl = Impl(name="interrupted", forward=stops_on_second_call, description="interrupted after one cell")
    res = audit_run.run_audit(impl, _cells(EASY), out=str(tmp_path), backward=False)
    v = res.report["verdict"]
    assert res.exit_code == 1 and not v["passed"] and v["n_failed"] == 0
    assert v["interrupted"] == f"interrupted after 1 of {len(EASY)} cells" and len(res.report["cells"]) == 1
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["interrupted"] == v["interrupted"]
    assert "INCOMPLETE" in (tmp_path / "report.html").read_text()
    assert any(line.startswith("INCOMPLETE: interrupted after 1") for line in audit_run.summary_lines(res.report))


def test_planted_bug_through_module_callable(tmp_path, capsys):
    rc, out, _ = _run_cli(["audit", "--impl", "tests.test_audit:omega_dropped_lla", "--out", str(tmp_path),
                           "--no-progress", "--no-backward", "--only", "gaussian:lam=0.1:B=1,H=1,S=40"], capsys)
    assert rc == 1
    assert "cause implementation" in out and "lla-verify check --case" in out


@pytest.mark.usefixtures("one_child")
def test_baseline_against_itself_then_doctored(tmp_path, capsys):
    base = tmp_path / "base"
    args = ["audit", "--impl", "torch-fp32", "--no-progress", "--no-backward", *ONLY]
    rc, _, _ = _run_cli([*args, "--out", str(base)], capsys)
    assert rc == 0
    rc, out, _ = _run_cli([*args, "--out", str(tmp_path / "same"), "--baseline", str(base / "report.json")], capsys)
    assert rc == 0, out
    rep = json.loads((tmp_path / "same" / "report.json").read_text())
    assert rep["regressions"] == [] and rep["baseline"]["matched"] == len(rep["cells"])

    doctored = json.loads((base / "report.json").read_text())
    for c in doctored["cells"]:
        c["forward_ratio"] = c["ratio"] = c["ratio"] / 100.0
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    # the dense reference sits at ratio ~1/3 by construction (FlashAttention's rule against
    # itself), under the default noise floor of 0.5: lower the floor to see growth
    rc, out, _ = _run_cli([*args, "--out", str(tmp_path / "reg"), "--baseline", str(tmp_path / "doctored.json"),
                           "--regression-floor", "0.05"], capsys)
    rep = json.loads((tmp_path / "reg" / "report.json").read_text())
    grown = [c for c in rep["cells"] if c["ratio"] > 0.05]
    assert grown, "the subset needs a cell above the regression floor"
    assert rc == 1 and len(rep["regressions"]) == len(grown)
    assert out.startswith("REGRESSIONS against the baseline")  # listed before the verdict
    html = (tmp_path / "reg" / "report.html").read_text()
    assert html.index("Regressions against the baseline") < html.index("Worst cells")


def test_compare_rules():
    def cell(ratio, passed=True, spec="s"):
        return {"spec": spec, "ratio": ratio, "forward_ratio": ratio, "passed": passed, "command": "c"}

    assert audit_baseline.compare([cell(0.4)], [cell(0.01)])[0] == []  # grew, but below the noise floor
    assert audit_baseline.compare([cell(0.9)], [cell(0.5)])[0] == []  # above the floor, but less than x2
    assert len(audit_baseline.compare([cell(0.9)], [cell(0.3)])[0]) == 1
    assert "newly failing" in audit_baseline.compare([cell(1.5, False)], [cell(0.9)])[0][0]["why"]
    assert len(audit_baseline.compare([cell(math.inf, False)], [cell(0.1)])[0]) == 1
    regs, info = audit_baseline.compare([cell(0.9, spec="new")], [cell(0.1, spec="old")])
    assert regs == [] and info == {"matched": 0, "new": 1, "missing": 1}


def test_cells_slice_runs_that_part_of_the_plan(tmp_path, capsys):
    # how an interrupted audit is finished: the plan is deterministic, --cells takes up where it stopped
    rc, out, _ = _run_cli(["audit", "--impl", "torch-fp32", "--cells", "60:62", "--no-backward", "--no-progress",
                           "--out", str(tmp_path)], capsys)
    rep = json.loads((tmp_path / "report.json").read_text())
    plan, _ = audit_plan.plan(get_impl("torch-fp32"))
    assert rc == 0, out
    assert [c["spec"] for c in rep["cells"]] == [c.case.spec() for c in plan[60:62]]
    assert "--cells 60:62" in rep["meta"]["command"]


@pytest.mark.usefixtures("one_child")
def test_slices_merge_into_one_complete_report(tmp_path, capsys):
    base = ["audit", "--impl", "torch-fp32", "--no-backward", "--no-progress", "--only", "kappa=100,"]
    outs = [str(tmp_path / n) for n in ("a", "b", "merged", "partial")]
    assert _run_cli(base + ["--cells", "0:1", "--out", outs[0]], capsys)[0] == 0
    assert _run_cli(base + ["--cells", "1:", "--out", outs[1]], capsys)[0] == 0
    slices = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("a", "b")]
    plan = slices[0]["meta"]["plan_size"]
    assert plan >= 2 and len(slices[0]["cells"]) == 1 and len(slices[1]["cells"]) == plan - 1
    rc, out, _ = _run_cli(["audit", "--merge", f"{outs[0]}/report.json", f"{outs[1]}/report.json",
                           "--out", outs[2]], capsys)
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert rc == 0 and out.startswith(f"PASS: 0 out of {plan} cells"), out
    assert [c["spec"] for c in merged["cells"]] == [c["spec"] for sl in slices for c in sl["cells"]]
    assert merged["verdict"]["interrupted"] is None and merged["meta"]["merged_from"][1].endswith("b/report.json")
    # given in the other order (as a glob may sort s105 before s15), the cells keep the plan's
    _run_cli(["audit", "--merge", f"{outs[1]}/report.json", f"{outs[0]}/report.json", "--out", outs[2]], capsys)
    swapped = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert [c["spec"] for c in swapped["cells"]] == [c["spec"] for c in merged["cells"]]
    # one slice alone is a partial audit, whatever its cells say
    rc, out, _ = _run_cli(["audit", "--merge", f"{outs[0]}/report.json", "--out", outs[3]], capsys)
    assert rc == 1 and f"INCOMPLETE: merged 1 of {plan} planned cells" in out, out


@pytest.mark.usefixtures("one_child")
def test_merge_compares_the_whole_audit_with_a_baseline(tmp_path, capsys):
    base = ["audit", "--impl", "torch-fp32", "--no-backward", "--no-progress", "--only", "kappa=100,"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run_cli(base + ["--cells", "0:1", "--out", a], capsys)
    _run_cli(base + ["--cells", "1:", "--out", b], capsys)
    slices = [f"{a}/report.json", f"{b}/report.json"]
    # a baseline in which the first cell's ratio was 100 times smaller (and a cell the
    # audit no longer plans): the merge alone sees it, each slice saw half the plan
    cells = [c for path in slices for c in json.loads(Path(path).read_text())["cells"]]
    grown = dict(cells[0], ratio=cells[0]["ratio"] / 100, forward_ratio=cells[0]["forward_ratio"] / 100)
    gone = dict(cells[0], spec=cells[0]["spec"].replace("seed=0", "seed=99"))
    (tmp_path / "base.json").write_text(json.dumps({"schema": audit_baseline.SCHEMA, "cells": [grown] + cells[1:] + [gone]}))
    rc, out, _ = _run_cli(["audit", "--merge", *slices, "--baseline", str(tmp_path / "base.json"),
                           "--regression-floor", "0", "--out", str(tmp_path / "m")], capsys)
    merged = json.loads((tmp_path / "m" / "report.json").read_text())
    assert rc == 1 and "REGRESSIONS against the baseline: 1" in out, out
    assert [r["spec"] for r in merged["regressions"]] == [cells[0]["spec"]]
    assert merged["baseline"] == {"matched": len(cells), "new": 0, "missing": 1}
    assert "--baseline" in merged["meta"]["command"]
    html = (tmp_path / "m" / "report.html").read_text()
    assert "Regressions against the baseline" in html and "&amp;" not in html, "markup escaped twice"


@pytest.mark.usefixtures("one_child")
def test_merge_refuses_reports_of_different_audits(tmp_path, capsys):
    for name, seed in (("s0", "0"), ("s1", "1")):
        _run_cli(["audit", "--impl", "torch-fp32", "--no-backward", "--no-progress", "--only", "kappa=100,",
                  "--cells", "0:1", "--seed", seed, "--out", str(tmp_path / name)], capsys)
    rc, _, err = _run_cli(["audit", "--merge", str(tmp_path / "s0/report.json"), str(tmp_path / "s1/report.json")],
                          capsys)
    assert rc == 2 and "--merge" in err and "seed=1" in err, err
    rc, _, err = _run_cli(["audit", "--merge", str(tmp_path / "nothing.json")], capsys)
    assert rc == 2 and "--merge: cannot read" in err, err


@pytest.mark.usefixtures("one_child")
def test_check_replays_a_case(capsys):
    spec = Case("gaussian", {"lam": 1.0}, S=17, D=8).spec()
    rc, out, _ = _run_cli(["check", "--case", spec, "--impl", "torch-fp32"], capsys)
    assert rc == 0 and "forward PASS" in out and spec in out
    rc, out, _ = _run_cli(["check", "--case", spec, "--impl", "tests.test_audit:omega_dropped_lla"], capsys)
    assert rc == 1 and "cause: implementation" in out


@pytest.mark.parametrize("argv,needle", [
    (["audit", "--impl", "no-such-impl"], "--impl"),
    (["audit", "--impl", "torch-fp32", "--quick", "--full"], "not allowed with"),
    (["audit", "--impl", "torch-fp32", "--seed", "x"], "--seed"),
    (["audit", "--impl", "torch-fp32", "--baseline", "/nonexistent/report.json"], "--baseline"),
    (["audit", "--impl", "torch-fp32", "--only", "no-such-family"], "--only"),
    (["audit", "--impl", "torch-fp32", "--cells", "9999:"], "--cells"),
    (["audit", "--impl", "torch-fp32", "--cells", "three"], "--cells"),
    (["audit", "--impl", "torch-fp32", "--device", "tpu"], "--device"),
    (["audit", "--impl", "torch-fp32", "--regression-factor", "0.5"], "--regression-factor"),
    (["check", "--case", "nofamily:x=1:S=4", "--impl", "torch-fp32"], "--case"),
    (["check", "--case", "gaussian:lam=1:S=4,D=4,dtype=float8", "--impl", "torch-fp32"], "--case"),
    (["check", "--impl", "torch-fp32"], "--case"),
], ids=["unknown-impl", "quick-and-full", "bad-seed", "missing-baseline", "only-nothing", "cells-nothing", "cells-garbled", "bad-device", "bad-factor",
        "bad-family", "bad-dtype", "no-case"])
def test_usage_errors_exit_2(argv, needle, capsys):
    rc, out, err = _run_cli(argv, capsys)
    assert rc == 2
    assert needle in err


def test_unavailable_impl_exits_2(capsys, monkeypatch):
    # the default impl is triton: without its kernel (or without CUDA) the audit says so and exits 2
    monkeypatch.setattr(cmd_audit, "plan", lambda *a, **k: pytest.fail("must not start the sweep"))
    rc, _, err = _run_cli(["audit", "--impl", "flashlla", "--device", "cpu"], capsys)
    assert rc == 2 and "--impl flashlla: not available on cpu" in err and "torch-fp32" in err


def test_plan_covers_every_family_and_sweep():
    impl = get_impl("torch-fp32")
    for full in (False, True):
        cells, skipped = audit_plan.plan(impl, full=full)
        fams = {c.case.family for c in cells}
        assert set(audit_plan.FAMILY_CELLS) | {"spectrum", "bandwidth", "gaussian", "lambda_decades"} <= fams
        assert {"float32", "bfloat16"} <= {c.case.dtype for c in cells}
        assert any(c.case.S % 16 for c in cells)
        kap = {c.case.params["kappa"] for c in cells if c.case.family == "spectrum"}
        assert min(kap) == 1.0 and max(kap) == 1e8
        grid = [c for c in cells if c.sweep == "scale-lambda"]
        assert len({c.case.params["lam"] for c in grid}) >= 3 and len({c.case.params["scale"] for c in grid}) >= 5
        assert len({c.case.spec() for c in cells}) == len(cells)
        if full:
            assert {64, 128} <= {c.case.D for c in cells} and max(c.case.S for c in cells) >= 2048
            assert 100 <= len(cells) <= 200
        else:
            assert max(c.case.S for c in cells) <= 48
    # a kernel with fixed head dims gets its cells skipped with the reason recorded
    narrow = Impl(name="d64", forward=dense_torch_lla, description="", head_dims=(64,))
    cells, skipped = audit_plan.plan(narrow, full=False)
    assert skipped and all("head_dim" in s["reason"] for s in skipped)


def test_triton_on_cpu_sets_the_interpreter():
    """triton.jit reads TRITON_INTERPRET when lla_triton is imported, so this needs a
    fresh interpreter that has not imported it (pytest's own process may have)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, sys; from lla_verify.commands import audit; audit.resolve_impl('triton', 'cpu'); "
            "print(os.environ.get('TRITON_INTERPRET'), 'lla_triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True"]


def test_triton_imported_compiled_on_cpu_is_a_usage_error(monkeypatch):
    import lla_triton  # noqa: F401  (the state this test is about)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UsageError, match="TRITON_INTERPRET=1"):
        cmd_audit.resolve_impl("triton", "cpu")


def test_merged_time_is_not_shown_as_a_wall_time():
    from lla_verify.audit.report import wall_text

    assert wall_text({"wall_s": 12.4}) == "12 s"
    assert wall_text({"wall_s": 700.0, "merged_from": ["a/report.json", "b/report.json"]}) == \
        "700 s summed over 2 slices"


def test_a_slice_says_its_verdict_is_partial(tmp_path):
    res = audit_run.run_audit(get_impl("torch-fp32"), _cells(EASY[:1]), out=str(tmp_path), backward=False,
                          meta={"cells_slice": "0:1", "plan_size": 9})
    lines = audit_run.summary_lines(res.report)
    assert any(line.startswith("slice 0:1 of a 9-cell plan") for line in lines), lines
    merged = dict(res.report, meta=dict(res.report["meta"], merged_from=["a", "b"]))
    assert not any(line.startswith("slice ") for line in audit_run.summary_lines(merged))



# ------------------------------------------------------------------ the other operators
MUT = "lla_verify.testing.mutants:"
ORACLES = ["--parallax-impl", "parallax-oracle", "--decode-impl", "lla-decode-oracle",
           "--parallax-decode-impl", "parallax-decode-oracle"]
OTHER_OPS = ("parallax", "lla-decode", "parallax-decode")


@pytest.mark.usefixtures("one_child")
def test_operator_cells_pass_with_correct_implementations(tmp_path, capsys):
    # S=19 and S=1: two problems in a batch and the first token, for each of the three operators
    rc, out, err = _run_cli(["audit", "--ops", ",".join(OTHER_OPS), *ORACLES, "--only", "S=19,", "--only", "S=1,",
                             "--no-progress", "--out", str(tmp_path)], capsys)
    assert rc == 0, out + err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert {c["op"] for c in rep["cells"]} == set(OTHER_OPS)
    assert set(rep["verdict"]["operators"]) == set(OTHER_OPS) and rep["meta"]["ops"] == list(OTHER_OPS)
    assert rep["meta"]["impls"] == {"parallax": "parallax-oracle", "lla-decode": "lla-decode-oracle",
                                    "parallax-decode": "parallax-decode-oracle"}
    for c in rep["cells"]:
        assert c["passed"] and c["command"].startswith(f"lla-verify check --case ") and f"--op {c['op']}" in c["command"]
        assert (c["grad"]["status"] == "checked") == (c["op"] == "parallax" and c["dtype"] == "float32"), c
        if c["op"] == "lla-decode":
            assert c["kappa_max"] is not None and "cg_iters_max" not in c  # the oracle reports no CG
    html = (tmp_path / "report.html").read_text()
    for op in OTHER_OPS:  # one section per operator
        assert f"id='op-{op}'" in html
    # the replay command of a cell is a working check of it
    c = next(c for c in rep["cells"] if c["op"] == "parallax-decode")
    assert _run_cli(shlex.split(c["command"])[1:], capsys)[0] == 0


@pytest.mark.parametrize("argv, op", [
    (["--ops", "parallax", "--parallax-impl", MUT + "px_dropped_nu"], "parallax"),
    (["--ops", "lla-decode", "--decode-impl", MUT + "dec_stale_length"], "lla-decode"),
    (["--ops", "parallax-decode", "--parallax-decode-impl", MUT + "pxdec_off_by_one_length"], "parallax-decode"),
], ids=["px-dropped-nu", "dec-stale-length", "pxdec-off-by-one"])
def test_operator_planted_bug_fails_the_audit(argv, op, tmp_path, capsys):
    rc, out, err = _run_cli(["audit", *argv, "--only", "S=19,", "--no-progress", "--out", str(tmp_path)], capsys)
    assert rc == 1, out + err
    rep = json.loads((tmp_path / "report.json").read_text())
    failed = [c for c in rep["cells"] if not c["passed"]]
    assert failed and all(c["op"] == op and c["cause"] == "implementation" for c in failed)
    assert f"FAIL {op} " in out and rep["verdict"]["operators"][op]["n_failed"] == len(failed)
    assert _run_cli(shlex.split(failed[0]["command"])[1:], capsys)[0] == 1  # the replay fails too


@pytest.mark.usefixtures("one_child")
def test_same_spec_under_two_operators_slices_merges_and_baselines(tmp_path, capsys):
    # the LLA shape cell S=7 and the lla-decode S=7 cell have one case spec: cells are keyed by operator too
    base = ["audit", "--ops", "lla,lla-decode", "--impl", "torch-fp32", "--decode-impl", "lla-decode-oracle",
            "--no-backward", "--no-progress", "--only", "gaussian:lam=1:B=1,H=1,S=7,D=16,dtype=float32"]
    outs = [tmp_path / n for n in ("a", "b", "merged", "again")]
    assert _run_cli(base + ["--cells", "0:1", "--out", str(outs[0])], capsys)[0] == 0
    assert _run_cli(base + ["--cells", "1:", "--out", str(outs[1])], capsys)[0] == 0
    rc, out, _ = _run_cli(["audit", "--merge", str(outs[0] / "report.json"), str(outs[1] / "report.json"),
                           "--out", str(outs[2])], capsys)
    merged = json.loads((outs[2] / "report.json").read_text())
    assert rc == 0 and out.startswith("PASS: 0 out of 2 cells"), out
    assert [c["op"] for c in merged["cells"]] == ["lla", "lla-decode"]
    assert merged["cells"][0]["spec"] == merged["cells"][1]["spec"]
    rc, out, _ = _run_cli(base + ["--out", str(outs[3]), "--baseline", str(outs[2] / "report.json")], capsys)
    rep = json.loads((outs[3] / "report.json").read_text())
    assert rc == 0 and rep["baseline"] == {"matched": 2, "new": 0, "missing": 0}, out
    # the baseline's LLA cell doctored: a regression of that cell alone, compared with its own
    # operator's cell
    doctored = json.loads((outs[2] / "report.json").read_text())
    for c in doctored["cells"]:
        if c["op"] == "lla":
            assert c["ratio"] > 0
            c["ratio"] = c["forward_ratio"] = lowered = c["ratio"] / 100
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    rc, out, _ = _run_cli(base + ["--out", str(outs[3]), "--baseline", str(tmp_path / "doctored.json"),
                                  "--regression-floor", "0"], capsys)
    rep = json.loads((outs[3] / "report.json").read_text())
    assert rc == 1 and [r.get("op", "lla") for r in rep["regressions"]] == ["lla"], out
    assert rep["regressions"][0]["baseline_ratio"] == lowered  # compared with the LLA cell, not the decode one


@pytest.mark.parametrize("argv, needle", [
    (["--ops", "nosuch"], "--ops"),
    (["--ops", ""], "--ops"),
    (["--ops", "lla", "--parallax-impl", "parallax-dense"], "--parallax-impl"),
    (["--ops", "parallax", "--parallax-impl", "nosuch"], "--parallax-impl"),
    (["--ops", "lla-decode", "--decode-impl", MUT + "nosuch"], "--decode-impl"),
    (["--ops", "parallax-decode", "--parallax-decode-impl", "triton"], "--parallax-decode-impl"),
])
def test_operator_usage_errors_exit_2(argv, needle, capsys, monkeypatch):
    monkeypatch.setattr(cmd_audit, "run_audit", lambda *a, **k: pytest.fail("must not start the sweep"))
    rc, _, err = _run_cli(["audit", "--impl", "torch-fp32", *argv], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err


@pytest.mark.usefixtures("one_child")
def test_an_operator_that_cannot_run_is_left_out_unless_asked_for(tmp_path, capsys, monkeypatch):
    from lla_verify.registry import operators

    monkeypatch.setattr(operators, "_triton_env", lambda *a: "no Triton here")
    rc, out, err = _run_cli(["audit", "--impl", "torch-fp32", "--no-backward", "--no-progress", *ONLY[:2],
                             "--out", str(tmp_path)], capsys)
    assert rc == 0, out + err
    assert "operator parallax left out: --parallax-impl parallax-triton: not available on cpu: no Triton here" in err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert {s["op"] for s in rep["skipped"] if s.get("op")} == set(OTHER_OPS)
    assert {c.get("op") for c in rep["cells"]} == {"lla"}
    rc, _, err = _run_cli(["audit", "--impl", "torch-fp32", "--ops", "lla,parallax", *ONLY[:2]], capsys)
    assert rc == 2 and "--parallax-impl parallax-triton: not available" in err


def test_operator_plans():
    from lla_verify.registry.operators import get_operator
    from lla_verify.registry.parallax import PROBES

    for op in OTHER_OPS:
        impl = get_operator(op).resolve(get_operator(op).builtins[0])
        quick, skipped = audit_plan.plan_op(op, impl)
        full, _ = audit_plan.plan_op(op, impl, full=True)
        assert not skipped and all(c.op == op for c in quick + full)
        # a handful of cells: make audit runs them through the Triton interpreter
        assert 4 <= len(quick) <= 15 and len(full) > len(quick)
        base = [get_operator(op).base_case(c.case) for c in quick]
        assert any(b.S == 1 for b in base) and any(b.B > 1 for b in base) and any(b.S % 16 for b in base)
        assert {"float32", "bfloat16"} <= {b.dtype for b in base}
        if op == "parallax":
            assert {c.case.probe for c in quick} == set(PROBES)
    assert {c.op for c in audit_plan.plan(get_impl("torch-fp32"))[0]} == {"lla"}
