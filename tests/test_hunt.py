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


def test_cli_exit_codes_and_replay(tmp_path):
    bad = _cli("--impl", "no-such-impl", "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert bad.returncode == 2 and "no-such-impl" in bad.stderr
    bad = _cli("--family", "nope", "--impl", "torch-fp32", "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert bad.returncode == 2 and "--family" in bad.stderr

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
