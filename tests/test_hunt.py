"""Tests of ``lla-verify hunt``: the search finds planted bugs, reports them replayably,
stores regressions, and keeps the audit's exit codes. All on CPU through dense torch
implementations (the kernels are searched by the same code; docs/hunt.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from lla_verify.commands import hunt
from lla_verify.budget.verdict import THRESHOLD
from lla_verify.registry.cases import FAMILIES, get_family, parse_case
from lla_verify.registry.impls import get_impl


def _objective(name: str) -> hunt.Objective:
    return hunt.Objective(get_impl(name), "cpu", S=12, D=4, dtype="float32")


def test_unit_cube_round_trip():
    for fam in FAMILIES.values():
        for p in fam.params:
            for x in (p.lo, p.easy, p.hi):
                assert math.isclose(hunt._from_unit(p, hunt._to_unit(p, x)), p.clip(x), rel_tol=1e-9, abs_tol=1e-12), \
                    f"{fam.name}.{p.name}: {x} does not survive the map to [0, 1] and back"


def test_hill_climb_starts_at_the_easy_point_and_keeps_the_maximum():
    obj = _objective("torch-fp32")
    res = hunt.hill_climb(obj, "offset", 6, np.random.default_rng(0))
    assert len(res.history) == 6 == obj.evals
    assert res.best.ratio == max(res.history)
    first = parse_case(res.best.case.spec())
    assert first.family == "offset"
    assert res.worst_so_far() == list(np.maximum.accumulate(res.history))


def test_a_correct_implementation_stays_under_threshold():
    # the dense fp32 reference is within its own budget by construction of the budget;
    # a hunt that calls it a failure would make every report below meaningless
    obj = _objective("torch-fp32")
    res = hunt.hill_climb(obj, "lambda_decades", 8, np.random.default_rng(1))
    assert res.best.ratio <= THRESHOLD, res.best.message
    assert res.first_over() is None


def test_hunt_finds_a_planted_bias():
    obj = _objective("lla_verify.testing.mutants:bias_01pct")
    res = hunt.hill_climb(obj, "offset", 10, np.random.default_rng(0))
    assert res.best.ratio > THRESHOLD, f"a 0.1% output bias went unnoticed: {res.best.message}"
    assert res.best.cause == "implementation"
    assert res.first_over() is not None and res.first_over() <= 10


def test_first_over_counts_evaluations():
    r = hunt.HuntResult("x", None, history=[0.1, 0.5, THRESHOLD * 2, 0.2])
    assert r.first_over() == 3
    assert hunt.HuntResult("x", None, history=[0.1]).first_over() is None


def test_add_regression_appends_once(tmp_path):
    path = tmp_path / "regressions.json"
    case = _objective("torch-fp32").case("offset", np.zeros(len(get_family("offset").params)), 3)
    hunt.add_regression(case, "first", path)
    hunt.add_regression(case, "again", path)
    data = json.loads(path.read_text())
    assert [d["spec"] for d in data] == [case.spec()]
    assert parse_case(data[0]["spec"]).spec() == case.spec()


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lla_verify.cli", "hunt", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _usage_error(*args, capsys, monkeypatch, cwd):
    """`lla-verify hunt ARGS` in this process: (exit code, stderr). For the usage errors,
    refused before any search; the subprocess runs above show the process's own exit codes."""
    from lla_verify.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        rc = main(["hunt", *args])
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    return rc, capsys.readouterr().err


def test_cli_exit_codes_and_replay(tmp_path, capsys, monkeypatch):
    rc, err = _usage_error("--impl", "no-such-impl", "--out", str(tmp_path / "a"),
                           capsys=capsys, monkeypatch=monkeypatch, cwd=tmp_path)
    assert rc == 2 and "no-such-impl" in err
    rc, err = _usage_error("--family", "nope", "--impl", "torch-fp32", "--out", str(tmp_path / "a"),
                           capsys=capsys, monkeypatch=monkeypatch, cwd=tmp_path)
    assert rc == 2 and "--family" in err

    found = _cli("--impl", "lla_verify.testing.mutants:bias_01pct", "--family", "offset", "--evals", "6",
                 "--seq", "12", "--head-dim", "4", "--compare-random", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert found.returncode == 1, found.stdout + found.stderr
    summary = json.loads((tmp_path / "b" / "hunt.json").read_text())
    assert summary["worst_ratio"] > THRESHOLD
    assert (tmp_path / "b" / "hunt.png").stat().st_size > 0
    row = summary["families"][0]
    assert {"hunt_first_over", "random_first_over", "random_worst"} <= row.keys()
    # the printed replay command reproduces the failure
    replay = [sys.executable, "-m", "lla_verify.cli", "check", "--impl", "lla_verify.testing.mutants:bias_01pct",
              "--device", "cpu", "--case", summary["worst_case"]]
    again = subprocess.run(replay, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1, again.stdout + again.stderr

    clean = _cli("--impl", "torch-fp32", "--family", "offset", "--evals", "4", "--seq", "12", "--head-dim", "4",
                 "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 of 1 families over threshold" in clean.stdout


@pytest.mark.parametrize("family", ["offset", "early"])
def test_random_search_samples_the_same_space(family):
    obj = _objective("torch-fp32")
    res = hunt.random_search(obj, family, 3, np.random.default_rng(5))
    assert len(res.history) == 3
    assert all(e >= 0 for e in res.history)


# ------------------------------------------------------------------ the other operators (registry/operators.py)
M = "lla_verify.testing.mutants:"


def _op_objective(op: str, spec: str, S: int = 9) -> hunt.Objective:
    from lla_verify.commands.audit import resolve_op_impl

    # in this process: the operator's check is the objective either way, and a worker's start
    # would dominate these few evaluations (the CLI test below runs them isolated)
    return hunt.Objective(resolve_op_impl(op, spec, "cpu"), "cpu", S=S, D=16, dtype="float32", op=op, isolate=False)


def test_parallax_cases_span_the_family_and_the_probe_family():
    from lla_verify.registry.operators import get_operator
    from lla_verify.registry.parallax import PROBES, ParallaxCase

    obj = _op_objective("parallax", "parallax-dense")
    for probe, pf in PROBES.items():
        space = hunt._space("offset", probe)
        assert len(space) == len(get_family("offset").params) + len(pf.params)
        for u in (np.zeros(len(space)), np.ones(len(space))):
            case = obj.case("offset", u, 5, probe)
            assert isinstance(case, ParallaxCase) and case.probe == probe
            for p, x in zip(pf.params, u[len(get_family("offset").params):]):
                assert case.probe_params[p.name] == hunt._from_unit(p, float(x))
            assert get_operator("parallax").parse_case(case.spec()).spec() == case.spec()
    assert hunt.label("offset", "lla") == "offset;probe=lla" and hunt.label("offset", None) == "offset"


@pytest.mark.parametrize("op, mutant, family, probe", [
    ("parallax", "px_dropped_nu", "gaussian", "random"),
    ("parallax", "px_unmasked_correction", "offset", "small_eig"),
    ("lla-decode", "dec_stale_length", "gaussian", None),
    ("lla-decode", "dec_off_by_one_length", "spectrum", None),
    ("parallax-decode", "pxdec_off_by_one_length", "gaussian", "random"),
    ("parallax-decode", "pxdec_stale_length", "offset", "lla"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_a_short_hunt_finds_the_planted_operator_bug(op, mutant, family, probe):
    obj = _op_objective(op, M + mutant)
    res = hunt.hill_climb(obj, family, 4, np.random.default_rng(0), probe=probe)
    assert res.best.ratio > THRESHOLD, res.best.message
    assert res.best.cause == "implementation" and res.first_over() is not None
    assert res.family == hunt.label(family, probe)


@pytest.mark.parametrize("op, impl, family, probe", [
    ("parallax", "parallax-dense", "offset", "small_eig"),
    ("parallax", "parallax-dense", "spectrum", "lla"),
    ("lla-decode", "lla-decode-oracle", "spectrum", None),
    ("parallax-decode", "parallax-decode-oracle", "gaussian", "large"),
])
def test_correct_operator_implementations_stay_under_threshold(op, impl, family, probe):
    obj = _op_objective(op, impl)
    res = hunt.hill_climb(obj, family, 4, np.random.default_rng(2), probe=probe)
    assert res.best.ratio <= THRESHOLD, res.best.message
    assert res.first_over() is None and len(res.history) == 4


def test_an_unbuildable_point_scores_zero_and_says_why(monkeypatch):
    from dataclasses import replace

    from lla_contract import LLAInputError
    from lla_verify.registry import operators

    obj = _op_objective("parallax", "parallax-dense")
    case = obj.case("gaussian", np.zeros(len(hunt._space("gaussian", "zero"))), 0, "zero")

    def refuse(case, device):
        raise LLAInputError("parallax case: probe lla reaches |r| = 1e+06, beyond float16's range")

    monkeypatch.setitem(operators.OPERATORS, "parallax", replace(operators.OPERATORS["parallax"], _build=refuse))
    ratio, cause, message = hunt.evaluate(obj.impl, "cpu", case, "parallax")
    assert (ratio, cause) == (0.0, hunt.UNBUILDABLE) and "beyond float16's range" in message


def test_add_regression_records_the_operator(tmp_path):
    from lla_verify.testing.regressions import pinned

    path = tmp_path / "regressions.json"
    obj = _op_objective("parallax", "parallax-dense")
    px = obj.case("offset", np.zeros(len(hunt._space("offset", "random"))), 3, "random")
    hunt.add_regression(px.case, "lla", path)
    hunt.add_regression(px, "parallax", path, op="parallax")
    hunt.add_regression(px.case, "decode: the same spec, another operator", path, op="lla-decode")
    hunt.add_regression(px, "again", path, op="parallax")
    data = json.loads(path.read_text())
    assert [(d["spec"], d.get("op")) for d in data] == [(px.case.spec(), None), (px.spec(), "parallax"),
                                                         (px.case.spec(), "lla-decode")]
    assert [c.spec() for c in pinned("parallax", path=path)] == [px.spec()]
    assert [c.spec() for c in pinned("lla", path=path)] == [px.case.spec()]
    assert [c.spec() for c in pinned("lla-decode", path=path)] == [px.case.spec()]


def test_cli_op_replay_and_usage_errors(tmp_path, capsys, monkeypatch):
    found = _cli("--op", "parallax", "--impl", M + "px_dropped_nu", "--family", "gaussian", "--probe", "random",
                 "--evals", "3", "--seq", "9", "--head-dim", "16", "--device", "cpu", "--out", str(tmp_path / "p"),
                 cwd=tmp_path)
    assert found.returncode == 1, found.stdout + found.stderr
    summary = json.loads((tmp_path / "p" / "hunt.json").read_text())
    assert summary["op"] == "parallax" and summary["worst_ratio"] > THRESHOLD
    assert summary["families"][0]["probe"] == "random" and ";probe=random" in summary["worst_case"]
    assert summary["replay"].startswith(f"lla-verify check --op parallax --impl {M}px_dropped_nu --device cpu --case ")
    assert "1 of 1 (family, probe) pairs over threshold" in found.stdout
    replay = [sys.executable, "-m", "lla_verify.cli", "check", "--op", "parallax", "--impl", M + "px_dropped_nu",
              "--device", "cpu", "--case", summary["worst_case"]]
    again = subprocess.run(replay, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1, again.stdout + again.stderr
    clean = _cli("--op", "lla-decode", "--impl", "lla-decode-oracle", "--family", "gaussian", "--evals", "2",
                 "--seq", "5", "--head-dim", "16", "--device", "cpu", "--out", str(tmp_path / "d"), cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 of 1 families over threshold" in clean.stdout
    for args, msg in [(["--op", "nope"], "--op: unknown operator 'nope'"),
                      (["--probe", "zero", "--impl", "torch-fp32"], "--probe: only with --op parallax"),
                      (["--op", "parallax", "--probe", "nope", "--impl", "parallax-dense"], "--probe: unknown 'nope'"),
                      (["--op", "parallax", "--impl", "torch-fp32"], "torch-fp32"),
                      (["--op", "lla-decode", "--impl", "parallax-decode-oracle"], "parallax-decode-oracle")]:
        rc, err = _usage_error(*args, "--device", "cpu", "--out", str(tmp_path / "x"),
                               capsys=capsys, monkeypatch=monkeypatch, cwd=tmp_path)
        assert rc == 2 and msg in err, (args, err)
