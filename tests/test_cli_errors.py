"""Every bad input of issue 21 (case specs, arguments, output paths, forged reports) is
one line on stderr with exit 2, or a correct verdict; none reaches a traceback.

CPU, torch-fp32 and tiny sizes; the few audit runs are slices of a three-cell plan.
"""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lla_contract import LLAInputError
from lla_verify import cliutil
from lla_verify.audit import baseline as audit_baseline
from lla_verify.audit import plan as audit_plan
from lla_verify.audit import report
from lla_verify.audit import run as audit_run
from lla_verify.commands import audit as cmd_audit
from lla_verify.registry.cases import FAMILIES, Case, parse_case
from lla_verify.cli import EXIT_INTERNAL, main

ROOT = Path(__file__).resolve().parent.parent
SHAPE = "B=1,H=1,S=4,D=8,dtype=float32,seed=0"


def run_cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors and --help
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_usage(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # argparse puts its usage line above the error line; ours is the error line alone
    assert lines and "error:" in lines[-1] and len(lines) <= 2, err
    for n in needles:
        assert n in err, (n, err)


# ------------------------------------------------------------------ case specs
@pytest.mark.parametrize("spec, needles", [
    (f"gaussian:lam=0:{SHAPE}", ("lam", "[0.001, 100]")),
    (f"gaussian:lam=-1:{SHAPE}", ("lam", "[0.001, 100]")),
    (f"gaussian:lam=1e-12:{SHAPE}", ("lam", "[0.001, 100]")),
    (f"gaussian:lam=inf:{SHAPE}", ("lam", "[0.001, 100]")),
    (f"gaussian:lam=nan:{SHAPE}", ("lam", "[0.001, 100]")),
    (f"gaussian:lam=\uff11:{SHAPE}", ("lam", "ASCII")),
    (f"gaussian:lam=1_0:{SHAPE}", ("lam", "ASCII")),
    ("gaussian::B=1,H=1,S=8,S=9,D=8", ("'S' given twice",)),
    (f"gaussian:lam=1,lam=2:{SHAPE}", ("'lam' given twice",)),
    ("gaussian::B=1,H=1,S=\uff18,D=8", ("S=", "ASCII")),
    (f"gaussian:lam:{SHAPE}", ("'lam' has no value", "lam=VALUE")),
    ("gaussian::B=1,H=1,S,D=8", ("'S' has no value",)),
    (f"spectrum:rotate=0.5:{SHAPE}", ("rotate", "an integer in [0, 1]")),
    (f"spectrum:kappa=1e9:{SHAPE}", ("kappa", "[1, 1e+08]")),
    (f"gaussian:zz=1:{SHAPE}", ("no parameter 'zz'",)),
    ("gaussian::B=0,H=1,S=4,D=8", ("B must be",)),
    ("gaussian::B=1,H=1,S=4,D=8,seed=99999999999999999999999", ("seed", "[0, 4294967295]")),
    ("gaussian::B=1,H=1,S=4,D=8,seed=-1", ("seed", "[0, 4294967295]")),
    ("gaussian::B=1,H=1,S=1000000000,D=16", ("needs about", "GiB", "available")),
    ("gaussian::B=1,H=1,S=100000,D=16", ("needs about", "GiB", "available")),
    ("gaussian::B=1,H=1,S=4,D=8,dtype=float8", ("dtype must be one of",)),
    (f"gaussian:lam=1,:{SHAPE}", ("empty parameter item",)),
], ids=["lam-0", "lam-negative", "lam-below-range", "lam-inf", "lam-nan", "fullwidth-digit", "underscore-digit",
        "duplicate-shape-key", "duplicate-param", "fullwidth-S", "param-without-value", "shape-without-value",
        "integer-param-fraction", "kappa-above-range", "unknown-param", "B-zero", "huge-seed", "negative-seed",
        "huge-S", "dense-too-large", "bad-dtype", "trailing-comma"])
def test_bad_case_spec_is_a_usage_error_naming_the_field(spec, needles, capsys):
    rc, out, err = run_cli(["check", "--case", spec, "--impl", "torch-fp32"], capsys)
    assert_usage(rc, err, "--case", *needles)


@pytest.mark.parametrize("params", [{"lam": 0.0}, {"lam": 1e3}, {"lam": math.nan}, {"rank": 2.5}, {"lam": True}],
                         ids=["below", "above", "nan", "fraction", "bool"])
def test_a_case_outside_its_family_cannot_be_made(params):
    fam = "subspace" if "rank" in params else "gaussian"
    with pytest.raises(LLAInputError, match=f"{next(iter(params))}"):
        Case(fam, params, S=4, D=8)


def test_nothing_is_clipped_the_case_that_runs_is_the_case_printed():
    # the values the issue found clipped: each is now refused, none runs as the nearest bound
    for lam in (0.0, -1.0, 1e-12, math.inf):
        with pytest.raises(LLAInputError):
            parse_case(f"gaussian:lam={lam}:{SHAPE}")
    # a value that 6 digits do not give back is printed with the digits it needs
    c = Case("gaussian", {"lam": 0.123456789012345}, S=4, D=8)
    assert parse_case(c.spec()) == c
    assert parse_case(c.spec()).build().ridge_lambda == c.build().ridge_lambda


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_spec_round_trip_is_exact(data):
    name = data.draw(st.sampled_from(sorted(FAMILIES)))
    params = {}
    for p in FAMILIES[name].params:
        if p.integer:
            params[p.name] = float(data.draw(st.integers(int(p.lo), int(p.hi))))
        else:
            params[p.name] = data.draw(st.floats(p.lo, p.hi, allow_nan=False))
    c = Case(name, params, S=data.draw(st.integers(1, 9)), D=4, seed=data.draw(st.integers(0, 2**32 - 1)))
    assert parse_case(c.spec()) == c


def test_every_stored_and_planned_spec_still_parses():
    """The strict parser against every spec the project writes: regressions, goldens,
    both audit plans for every implementation record, the cg sweep's grid."""
    from lla_verify.goldens.catalog import CATALOG
    from lla_verify.commands.cg import kappa_grid
    from lla_verify.registry.impls import get_impl

    from lla_verify.registry.operators import get_operator

    # every spec is read by its own operator's parser (an entry without one is LLA)
    for d in json.loads((ROOT / "properties" / "regressions.json").read_text()):
        op = get_operator(d.get("op", "lla"))
        assert op.spec(op.parse_case(d["spec"])) == d["spec"]
    for g in CATALOG:
        op = get_operator(g.op)
        assert op.parse_case(op.spec(g.case)) == g.case
    for name in ("triton", "torch-fp32", "oracle-f64"):
        for full in (False, True):
            for cell in audit_plan.plan(get_impl(name), full=full)[0]:
                op = get_operator(cell.op)
                assert op.parse_case(op.spec(cell.case)) == cell.case
    for kap in kappa_grid(9):
        Case("spectrum", {"kappa": kap, "rotate": 1})
    stored = sorted((ROOT / "baselines").glob("*.json"))
    assert stored, "no stored baseline under baselines/"
    for path in stored:
        audit_baseline.load_baseline(str(path))  # the stored GPU audits stay valid baselines


def test_memory_is_estimated_before_anything_is_allocated(monkeypatch):
    import lla_verify.registry.cases as cases

    monkeypatch.setattr(cases, "available_bytes", lambda device="cpu": 2**10)
    with pytest.raises(LLAInputError, match="needs about .* GiB of cpu memory"):
        Case("gaussian", {}, S=64, D=16).build()


# ------------------------------------------------------------------ arguments
@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """Three one-cell slices of a three-cell plan (torch-fp32, forward only)."""
    root = tmp_path_factory.mktemp("slices")
    base = ["audit", "--impl", "torch-fp32", "--no-backward", "--no-progress", "--only", "gaussian:lam=0.1:",
            "--only", "gaussian:lam=1:B=1,H=1,S=1,"]
    paths = []
    for i in range(3):
        out = root / f"s{i}"
        assert main(base + ["--cells", f"{i}:{i + 1}", "--out", str(out)]) == 0
        paths.append(out / "report.json")
    assert json.loads(paths[0].read_text())["meta"]["plan_size"] == 3
    return paths


def _edit(path: Path, dest: Path, fn) -> str:
    rep = json.loads(path.read_text())
    fn(rep)
    dest.write_text(json.dumps(rep))
    return str(dest)


@pytest.mark.parametrize("argv, needles", [
    (["check", "--case", f"gaussian::{SHAPE}", "--impl", ":"], ("--impl", "MODULE:CALLABLE")),
    (["check", "--case", f"gaussian::{SHAPE}", "--impl", "nosuchmod_xyz:fn"], ("--impl", "cannot import")),
    (["check", "--case", f"gaussian::{SHAPE}", "--impl", "lla_verify.testing.mutants:nosuch"], ("--impl", "no attribute")),
    (["audit", "--impl", ":"], ("--impl",)),
    (["audit", "--seed", "99999999999999999999999"], ("--seed",)),
    (["cg", "--kappas", "-3"], ("--kappas",)),
    (["cg", "--kappas", "0"], ("--kappas",)),
    (["cg", "--tol", "-1"], ("--tol",)),
    (["cg", "--tol", "nan"], ("--tol",)),
    (["cg", "--tol", "0"], ("--tol",)),
    (["cg", "--max-iters", "-5"], ("--max-iters",)),
    (["cg", "--impl", "nosuch"], ("--impl", "nosuch")),
    (["cg", "--impl", ":"], ("--impl",)),
    (["cg", "--device", "tpu"], ("--device", "tpu")),
    (["cg", "--seed", "-1"], ("--seed",)),
    (["hunt", "--impl", ":"], ("--impl",)),
    (["hunt", "--impl", "torch-fp32", "--seq", "0"], ("--seq",)),
    (["hunt", "--impl", "torch-fp32", "--evals", "0"], ("--evals",)),
    (["hunt", "--impl", "torch-fp32", "--seed", "-4"], ("--seed",)),
    (["hunt", "--impl", "torch-fp32", "--device", "tpu"], ("--device",)),
    (["hunt", "--impl", "torch-fp32", "--seq", "1000000000", "--head-dim", "64"], ("needs about",)),
    (["hunt", "--impl", "triton", "--head-dim", "8"], ("head_dim",)),
    (["bench", "--shapes", "1,2"], ("--shapes",)),
    (["bench", "--ridge-lambda", "nan"], ("--ridge-lambda",)),
    (["bench", "--ridge-lambda", "0"], ("--ridge-lambda",)),
    (["bench", "--precisions", "fp64"], ("--precisions",)),
    (["bench", "--fixed-iters", "0"], ("--fixed-iters",)),
    (["bench", "--configs", "64,64"], ("--configs",)),
    (["bench-backward", "--ridge-lambda", "nan"], ("--ridge-lambda",)),
    (["bench-backward", "--oracle-heads", "0"], ("--oracle-heads",)),
    (["bench-backward", "--sweep-dims", "64,32"], ("--sweep-dims",)),
    (["goldens", "compare", "--impl", ":"], ("--impl",)),
    (["goldens", "compare", "--impl", "torch-fp32", "--device", "tpu"], ("--device",)),
    (["goldens", "compare", "--impl", "torch-fp32", "--only", "nosuch"], ("--only",)),
    (["info", "--nosuch"], ("unrecognized",)),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_argument_is_one_line_exit_2(argv, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written by mistake lands here
    rc, out, err = run_cli(argv, capsys)
    assert_usage(rc, err, *needles)


@pytest.mark.parametrize("flag", ["--merge", "--baseline"])
@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe{not utf-8", "not UTF-8"),
    (b'{"cells": [', "as JSON"),
    (b"[" * 100000, "as JSON"),
    (b'{"schema": "lla-verify-audit/1", "cells": [{"ratio": 1}]}', "no case spec"),
    (b'{"schema": "other", "cells": []}', "schema"),
], ids=["non-utf8", "truncated", "deep", "cell-without-spec", "wrong-schema"])
def test_unreadable_report_is_a_usage_error(flag, content, needle, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    argv = ["audit", "--merge", str(bad)] if flag == "--merge" else \
        ["audit", "--impl", "torch-fp32", "--baseline", str(bad), "--out", str(tmp_path / "o")]
    rc, _, err = run_cli(argv, capsys)
    assert_usage(rc, err, flag, needle)


# ------------------------------------------------------------------ merging and baselines
def _set_cell(**kw):
    def fn(rep):
        rep["cells"][0].update(kw)
    return fn


@pytest.mark.parametrize("edit, needle", [
    (_set_cell(ratio="abc"), "expected a ratio"),
    (_set_cell(ratio=-1.0), "expected a ratio"),
    (_set_cell(ratio=None), "expected a ratio"),
    (_set_cell(ratio=1e9, forward_ratio=1e9), "marked passed with ratio"),
    (_set_cell(ratio=1e9), "marked passed with ratio"),
    (_set_cell(ratio=0.0), "below its forward ratio"),
    (_set_cell(forward_ratio=2.0, ratio=2.0), "forward check marked passed"),
    (_set_cell(ratio="nan", forward_ratio="nan"), "marked passed"),
    (_set_cell(passed="yes"), "'passed' must be true or false"),
    (lambda rep: rep["cells"][0].pop("spec"), "no case spec"),
    (_set_cell(spec="gaussian:lam=0:B=1"), "is not a case"),
    (_set_cell(forward_passed=False), "failed forward check"),
    (lambda rep: rep["meta"].update(plan_size=3.5), "plan_size"),
    (lambda rep: rep["meta"].update(cell_indices=[7]), "cell_indices"),
    (lambda rep: rep["meta"].pop("plan_digest"), "plan_digest"),
], ids=["ratio-text", "ratio-negative", "ratio-missing", "forged-pass", "forged-cell-ratio", "ratio-below-check", "forward-forged",
        "nan-passed", "passed-text", "no-spec", "bad-spec", "passed-with-failed-check", "plan-size-float",
        "indices-outside", "no-digest"])
def test_forged_or_malformed_slice_is_refused(slices, edit, needle, tmp_path, capsys):
    forged = _edit(slices[0], tmp_path / "forged.json", edit)
    rc, out, err = run_cli(["audit", "--merge", forged, str(slices[1]), str(slices[2])], capsys)
    assert_usage(rc, err, "--merge", needle)
    assert "PASS" not in out


def test_a_slice_with_its_plan_size_edited_does_not_pass_for_the_whole(slices, tmp_path, capsys):
    # the case: one slice of a larger plan, meta.plan_size edited to its own size
    def shrink(rep):
        rep["meta"]["plan_size"] = 1
        rep["meta"]["cells_slice"] = None
        rep["meta"]["cell_indices"] = [0]
    forged = _edit(slices[1], tmp_path / "forged.json", shrink)
    rc, out, err = run_cli(["audit", "--merge", forged], capsys)
    assert_usage(rc, err, "plan_digest")
    # and the same slice honestly merged alone is an incomplete audit, never a pass
    rc, out, err = run_cli(["audit", "--merge", str(slices[1])], capsys)
    assert rc == 1 and "INCOMPLETE: merged 1 of 3 planned cells" in out, out


def test_slices_that_overlap_or_leave_a_gap(slices, tmp_path, capsys):
    rc, _, err = run_cli(["audit", "--merge", str(slices[0]), str(slices[0]), str(slices[1]), str(slices[2])],
                         capsys)
    assert_usage(rc, err, "slices overlap")
    rc, out, _ = run_cli(["audit", "--merge", str(slices[0]), str(slices[2])], capsys)
    assert rc == 1 and "INCOMPLETE: merged 2 of 3" in out
    rc, out, _ = run_cli(["audit", "--merge", *map(str, slices), "--out", str(tmp_path / "m")], capsys)
    assert rc == 0 and out.startswith("PASS: 0 out of 3 cells"), out


def test_slices_of_other_modes_or_impls_are_refused(slices, tmp_path, capsys):
    for key, val in (("mode", "full"), ("impl", "triton"), ("plan_size", 4)):
        other = _edit(slices[1], tmp_path / f"{key}.json", lambda rep: rep["meta"].update({key: val}))
        rc, _, err = run_cli(["audit", "--merge", str(slices[0]), other, str(slices[2])], capsys)
        assert_usage(rc, err, key)


def test_baseline_that_matches_nothing_or_holds_bad_ratios(slices, tmp_path, capsys):
    def retire(rep):
        for c in rep["cells"]:
            c["spec"] = c["spec"].replace("seed=0", "seed=77")
    elsewhere = _edit(slices[0], tmp_path / "elsewhere.json", retire)
    rc, _, err = run_cli(["audit", "--merge", *map(str, slices), "--baseline", elsewhere], capsys)
    assert_usage(rc, err, "--baseline", "matches none")
    # before the sweep, not after it
    rc, _, err = run_cli(["audit", "--impl", "torch-fp32", "--only", "gaussian:lam=0.1:", "--no-progress",
                          "--baseline", elsewhere, "--out", str(tmp_path / "o")], capsys)
    assert_usage(rc, err, "--baseline", "matches none")
    assert not (tmp_path / "o" / "report.json").exists()
    bad = _edit(slices[0], tmp_path / "bad.json", _set_cell(ratio="fast"))
    rc, _, err = run_cli(["audit", "--merge", *map(str, slices), "--baseline", bad], capsys)
    assert_usage(rc, err, "--baseline", "expected a ratio")


# ------------------------------------------------------------------ outputs
def _unwritable(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits: refuse the probe as the kernel would
        real = cliutil.tempfile.mkstemp

        def mkstemp(*a, dir=None, **kw):
            if dir is not None and Path(dir).resolve().is_relative_to(d.resolve()):
                raise PermissionError(13, "Permission denied")
            return real(*a, dir=dir, **kw)
        monkeypatch.setattr(cliutil.tempfile, "mkstemp", mkstemp)
    return str(d)


@pytest.mark.parametrize("kind", ["existing-file", "under-a-file", "unwritable"])
@pytest.mark.parametrize("command", ["audit", "audit-merge", "cg", "hunt", "bench"])
def test_bad_out_is_refused_before_any_work(kind, command, slices, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("keep me")
    out = {"existing-file": str(tmp_path / "afile"), "under-a-file": str(tmp_path / "afile" / "sub"),
           "unwritable": None}[kind]
    if out is None:
        out = _unwritable(tmp_path, monkeypatch) + ("/report.md" if command == "bench" else "")
    if command == "bench" and kind == "existing-file":
        out = str(tmp_path)  # bench writes a file: a folder is its wrong kind of path
    import lla_verify.commands.cg as cg_study
    import lla_verify.commands.hunt as hunt

    def boom(*a, **k):
        pytest.fail("work started before --out was checked")
    monkeypatch.setattr(cmd_audit, "run_audit", boom)
    monkeypatch.setattr(cmd_audit, "merge_reports", boom)
    monkeypatch.setattr(cg_study, "run_study", boom)
    monkeypatch.setattr(hunt, "hill_climb", boom)
    argv = {"audit": ["audit", "--impl", "torch-fp32", "--no-progress"],
            "audit-merge": ["audit", "--merge", *map(str, slices)],
            "cg": ["cg", "--impl", "none", "--no-progress"],
            "hunt": ["hunt", "--impl", "torch-fp32", "--family", "gaussian", "--evals", "1"],
            "bench": ["bench"]}[command]
    rc, _, err = run_cli(argv + ["--out", out], capsys)
    assert_usage(rc, err, "--out")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_report_write_interrupted_leaves_no_truncated_file(tmp_path, monkeypatch):
    rep = {"schema": audit_baseline.SCHEMA, "meta": {}, "verdict": audit_run.audit_verdict([], []), "regressions": [],
           "baseline": None, "skipped": [], "cells": []}
    report.write_reports(rep, str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert before["report.html"] and before["report.json"]

    def interrupted(_):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "render_html", interrupted)  # Ctrl-C while the HTML is made
    with pytest.raises(KeyboardInterrupt):
        report.write_reports(dict(rep, regressions=[{"spec": "x", "why": "y"}]), str(tmp_path))
    assert (tmp_path / "report.html").read_bytes() == before["report.html"]
    mid = (tmp_path / "report.json").read_bytes()  # written whole before the interruption
    assert json.loads(mid)["regressions"] == [{"spec": "x", "why": "y"}]

    def cut(fd):  # Ctrl-C after the bytes went out, before the rename
        raise KeyboardInterrupt
    monkeypatch.setattr(cliutil.os, "fsync", cut)
    with pytest.raises(KeyboardInterrupt):
        cliutil.atomic_write(tmp_path / "report.json", b"{}")
    assert (tmp_path / "report.json").read_bytes() == mid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"], "a temp file was left"


def _writers(tree: ast.AST):
    """Calls that write a file in place: open(..., 'w'/'a'/'x'), write_text, write_bytes, savefig."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if name in ("write_text", "write_bytes"):
            yield node.lineno, name
        # a figure saved into an in-memory buffer (report.py embeds it) writes no file
        if name == "savefig" and not (node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "buf"):
            yield node.lineno, name
        if name == "open":
            modes = [a for a in node.args[1:2]] + [k.value for k in node.keywords if k.arg == "mode"]
            for m in modes:
                if isinstance(m, ast.Constant) and isinstance(m.value, str) and set(m.value) & set("wax"):
                    yield node.lineno, f"open(..., {m.value!r})"


def test_every_report_writer_is_atomic():
    """No module of the harness writes a file in place; cliutil's atomic_write and
    save_figure are the only writers."""
    found = []
    for path in sorted((ROOT / "lla_verify").glob("*.py")):
        if path.name == "cliutil.py":
            continue
        for line, what in _writers(ast.parse(path.read_text())):
            found.append(f"{path.name}:{line} {what}")
    assert not found, found


# ------------------------------------------------------------------ internal errors
def test_a_stray_exception_is_one_line_with_its_own_status(capsys, monkeypatch):
    import lla_verify.commands.info as cmd_info

    def broken():
        raise ZeroDivisionError("planted")
    monkeypatch.setattr(cmd_info, "collect", broken)
    monkeypatch.delenv("LLA_VERIFY_DEBUG", raising=False)
    rc, _, err = run_cli(["info"], capsys)
    assert rc == EXIT_INTERNAL == 3
    assert err.strip().count("\n") == 0 and "internal error: ZeroDivisionError: planted" in err
    assert "LLA_VERIFY_DEBUG=1" in err and "Traceback" not in err
    monkeypatch.setenv("LLA_VERIFY_DEBUG", "1")
    rc, _, err = run_cli(["info"], capsys)
    assert rc == 3 and "Traceback" in err and "ZeroDivisionError" in err


def test_cg_study_kappas_zero_is_refused_not_replaced_by_the_default(tmp_path):
    from lla_verify.commands.cg import run_study

    with pytest.raises(ValueError, match="--kappas"):
        run_study(impl_name="none", kappas=0, out=str(tmp_path), progress=False, log=lambda *_: None)
    assert not any(tmp_path.iterdir())
