"""Judge a property-suite run against the public FlashLLA from its JUnit XML.

The suite is expected to FAIL on the public kernel, and for its own defects only:

  - at least one forward-accuracy failure ("[flashlla] forward FAIL") and at least one
    gradient failure ("[flashlla] backward FAIL ... (dq, dk, dv only)");
  - every failure an assertion (AssertionError, or Hypothesis' groups and flaky reports
    of them): any other exception raised (an LLAInputError from the adapter above all), or a
    pytest error (setup, teardown, collection) is the harness's fault;
  - no skip but those the implementation record names (Impl.skips, and Impl.refusals for
    the configurations it does not accept);
  - no failure in a property that does not call the implementation (the CG study of
    lla_triton, the oracle against mpmath);
  - a result from every LLA property file (all of properties/ but the other operators'),
    and no test twice (the parts of a split run are disjoint);
  - for a whole run, a result for every test pytest collects from that suite (the check
    collects it itself, ``pytest --collect-only`` with the run's options; ``--collected
    FILE`` gives the list instead, ``--no-collect`` leaves the rule out).

    python scripts/flashlla_suite_check.py JUNIT.xml [--impl flashlla] [--pytest-rc N] [--json OUT]
    python scripts/flashlla_suite_check.py A.xml B.xml --pytest-rc 1 1    # a run split in two calls

A part cut short (pytest rc 2) leaves the run incomplete unless the other parts ran every
test it did not finish: that is what the collected list shows, so with it the whole run
is complete exactly when every collected test has one result.

Exit 0 when the run looks as expected, 1 when it does not, 2 when it is incomplete
(a collected test without a result; without the collected list, pytest interrupted) or
unreadable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# the property files of the other operators: they run lla-verify's own Parallax and decode
# kernels whatever --lla-impl names, so a run against the public kernel leaves them out
# (scripts/gpu-flashlla.sh's --ignore list; tests/test_gpu_flashlla_script.py holds the two
# together), and every other property file must have run
NON_LLA_PROPERTY_FILES = ("test_parallax.py", "test_parallax_oracle_vs_mp.py", "test_decode.py",
                          "test_operator_regressions.py")
# properties that do not call the implementation under test (they check lla_triton's CG and
# the float64 oracle): a failure there is not the implementation's
NOT_THE_IMPL = ("test_cg_convergence", "test_oracle_vs_mp")
ALLOWED_EXC = {"AssertionError", "builtins.AssertionError", "ExceptionGroup", "BaseExceptionGroup",
               "FlakyFailure", "hypothesis.errors.FlakyFailure", "FlakyBackendFailure"}
# an exception name at the start of a failure line: "E   pkg.Name: ...", "  | Name: ...", "Name: ..."
EXC_RE = re.compile(r"^(?:E(?=\s))?[\s|+\-]*([A-Za-z_][\w.]*(?:Error|Exception|Failure|Group|Exit|Interrupt))(?::|\s*$)", re.M)


def exception_names(text: str) -> set[str]:
    return set(EXC_RE.findall(text))


def expected_modules(properties_dir) -> set[str]:
    """The property modules a run against the public kernel must cover: every
    ``test_*.py`` of ``properties_dir`` but the other operators' files."""
    return {p.stem for p in Path(properties_dir).glob("test_*.py") if p.name not in NON_LLA_PROPERTY_FILES}


def suite_args(impl: str) -> list[str]:
    """The options the LLA suite runs with against ``impl`` (scripts/gpu-flashlla.sh)."""
    return ["properties", *(f"--ignore=properties/{f}" for f in NON_LLA_PROPERTY_FILES), "--lla-impl", impl]


def test_id(node_id: str) -> str:
    """A pytest node id (``properties/test_x.py::name[param]``) as the JUnit file names the
    test (``properties.test_x::name[param]``)."""
    path, _, name = node_id.partition("::")
    return f"{path.removesuffix('.py').replace('/', '.')}::{name}"


def read_collected(text: str) -> set[str]:
    """The tests of ``pytest --collect-only -q`` output, as the JUnit file names them."""
    return {test_id(line.strip()) for line in text.splitlines() if "::" in line and not line.startswith(" ")}


def collect_suite(impl: str, repo=None) -> set[str]:
    """Collect the LLA suite as a run against ``impl`` does (no GPU, no kernel needed)."""
    repo = Path(repo or Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), str(repo / "kernels"),
                                                                     os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "--collect-only", "-q", *suite_args(impl)],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"collecting the suite failed (pytest rc {run.returncode}): {run.stdout[-1500:]}"
                           f"{run.stderr[-1500:]}")
    return read_collected(run.stdout)


def judge(xml_text, impl_skips: dict, *, pytest_rc=None, impl: str = "flashlla", part: bool = False,
          expect_modules=None, collected=None) -> dict:
    """``xml_text``: one JUnit XML text, or a list of them (the parts of one suite run
    split across calls), with ``pytest_rc`` one exit status or a list of one a part.
    ``part``: the XMLs are some of the parts only, so what only the whole run can show
    (a forward and a gradient failure, pytest failing, every module in ``expect_modules``
    having run) is not asked of them. A test in more than one part is a problem: the parts
    of one run hold disjoint tests. ``collected``: the test ids the whole suite holds
    (:func:`collect_suite`); with it, the run is complete when each has a result, whatever
    the parts' exit statuses, and a result for a test it does not hold is a problem."""
    texts = [xml_text] if isinstance(xml_text, str) else list(xml_text)
    rcs = pytest_rc if isinstance(pytest_rc, (list, tuple)) else [pytest_rc] * len(texts)
    if len(rcs) != len(texts):
        raise ValueError(f"pytest_rc: one exit status a JUnit file expected ({len(texts)}), got {len(rcs)}")
    res = {"tests": 0, "unnamed": 0, "passed": 0, "forward_failures": [], "gradient_failures": [], "other_failures": [],
           "harness_errors": [], "bad_skips": [], "record_skips": 0, "problems": [], "notes": [],
           "incomplete": False}
    allowed_skips = [r for r in impl_skips.values() if r]
    seen: dict[str, int] = {}
    for tc in (tc for t in texts for tc in ET.fromstring(t).iter("testcase")):
        if not tc.get("name"):
            # pytest-xdist writes a name-less, result-less entry for reports it never
            # matched to a test (a run cut short): not a pass, and not a test
            res["unnamed"] += 1
            continue
        res["tests"] += 1
        tid = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        seen[tid] = seen.get(tid, 0) + 1
        fail, err, skip = tc.find("failure"), tc.find("error"), tc.find("skipped")
        if err is not None:
            res["harness_errors"].append(f"{tid}: pytest error: {(err.get('message') or '')[:300]}")
            continue
        if skip is not None:
            msg = (skip.get("message") or "") + " " + (skip.text or "")
            if any(r in msg for r in allowed_skips):
                res["record_skips"] += 1
            else:
                res["bad_skips"].append(f"{tid}: {msg.strip()[:300]}")
            continue
        if fail is None:
            res["passed"] += 1
            continue
        text = (fail.get("message") or "") + "\n" + (fail.text or "")
        names = exception_names(text)
        foreign = sorted(n for n in names if n not in ALLOWED_EXC)
        if foreign or not (names & ALLOWED_EXC):
            res["harness_errors"].append(f"{tid}: raised {foreign or sorted(names) or 'no exception named'}"
                                         ": "
                                         f"{(fail.get('message') or '')[:300]}")
            continue
        line = f"{tid}: {(fail.get('message') or '').splitlines()[0][:300] if fail.get('message') else ''}"
        if any(m in tid for m in NOT_THE_IMPL):
            res["harness_errors"].append(f"{line} (a property that does not call {impl})")
            continue
        if f"[{impl}] forward FAIL" in text:
            res["forward_failures"].append(line)
        elif f"[{impl}] backward FAIL" in text:
            res["gradient_failures"].append(line)
            if "(dq, dk, dv only)" not in text:
                res["problems"].append(f"{tid}: a gradient verdict that does not say it judged dq, dk, dv only")
        else:
            res["other_failures"].append(line)
    twice = sorted(t for t, n in seen.items() if n > 1)
    if twice:
        res["problems"].append(f"{len(twice)} tests ran more than once (parts that overlap?): {', '.join(twice[:3])}")
    if expect_modules is not None and not part:
        ran = {t.split("::", 1)[0].rsplit(".", 1)[-1] for t in seen}
        missing = sorted(set(expect_modules) - ran)
        if missing:
            res["problems"].append(f"no result from {len(missing)} property files ({', '.join(missing)}): "
                                   "the run does not cover the suite")
    covered = False
    if collected is not None and not part:
        missing, extra = sorted(set(collected) - set(seen)), sorted(set(seen) - set(collected))
        if missing:
            res["incomplete"] = True
            res["problems"].append(f"{len(missing)} of the {len(collected)} collected tests have no result: "
                                   f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if extra:
            res["problems"].append(f"{len(extra)} results for tests the suite does not collect (another version of "
                                   f"the suite?): {', '.join(extra[:4])}")
        covered = not missing
        if covered:
            res["notes"].append(f"every one of the {len(collected)} collected tests has a result")
    if res["unnamed"]:
        msg = f"{res['unnamed']} testcase entries without a name (not counted: a run cut short leaves them)"
        # with every collected test accounted for, they are the cut part's entries for tests another part ran
        (res["notes"] if covered else res["problems"]).append(msg)
    if 2 in rcs:
        if covered:
            res["notes"].append("a part was cut short (pytest rc 2); the other parts ran the tests it did not finish")
        else:
            res["incomplete"] = True
            res["problems"].append("pytest was interrupted (rc 2): the run is incomplete")
    if not part:
        if rcs and all(rc == 0 for rc in rcs):
            res["problems"].append("pytest passed (rc 0): the suite no longer detects the public kernel's defects")
        if not res["forward_failures"]:
            res["problems"].append("no forward-accuracy failure: the documented forward defect went undetected")
        if not res["gradient_failures"]:
            res["problems"].append("no gradient failure: the documented backward defect went undetected")
    if res["harness_errors"]:
        res["problems"].append(f"{len(res['harness_errors'])} harness errors (failures that are not assertions, or in properties "
                               "that do not call the implementation)")
    if res["bad_skips"]:
        res["problems"].append(f"{len(res['bad_skips'])} skips the record does not name")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("junit", nargs="+", help="the run's JUnit XML; several: the parts of a run split across calls")
    ap.add_argument("--impl", default="flashlla")
    ap.add_argument("--pytest-rc", type=int, nargs="+", default=None,
                    help="pytest's exit status, one a JUnit file in their order")
    ap.add_argument("--part", action="store_true",
                    help="the files are only some parts of a split run: judge the whole with every part's file")
    ap.add_argument("--collected", default=None,
                    help="the suite's tests, as `pytest --collect-only -q` prints them (default: collect them here)")
    ap.add_argument("--no-collect", action="store_true",
                    help="do not ask a whole run for a result from every collected test")
    ap.add_argument("--json", default=None, help="write the judgement here")
    args = ap.parse_args(argv)
    from lla_verify.registry.impls import get_impl

    rcs = args.pytest_rc if args.pytest_rc is not None else [None] * len(args.junit)
    if len(rcs) != len(args.junit):
        ap.error(f"--pytest-rc: one exit status a JUnit file expected ({len(args.junit)}), got {len(rcs)}")
    texts = []
    for path in args.junit:
        try:
            with open(path) as fh:
                texts.append(fh.read())
        except (OSError, UnicodeDecodeError) as exc:
            print(f"suite check: cannot read {path}: {exc}")
            return 2
    collected = None
    if not args.part and not args.no_collect:
        try:
            collected = (read_collected(Path(args.collected).read_text()) if args.collected
                         else collect_suite(args.impl))
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"suite check: cannot list the suite's tests: {exc}")
            return 2
    record = get_impl(args.impl)  # a built-in name, or MODULE:CALLABLE (the CPU emulation, say)
    try:
        res = judge(texts, record.declared_skips(), pytest_rc=rcs, impl=record.name, part=args.part,
                    expect_modules=expected_modules(Path(__file__).resolve().parents[1] / "properties"),
                    collected=collected)
    except ET.ParseError as exc:
        print(f"suite check: cannot parse {' '.join(args.junit)}: {exc}")
        return 2
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    print(f"suite check ({record.name}): {res['tests']} tests ({res['unnamed']} unnamed entries not counted), "
          f"{res['passed']} passed, "
          f"{len(res['forward_failures'])} forward failures, {len(res['gradient_failures'])} gradient failures, "
          f"{len(res['other_failures'])} other assertion failures, {len(res['harness_errors'])} harness errors, "
          f"{res['record_skips']} skips named by the record, {len(res['bad_skips'])} other skips")
    for key in ("forward_failures", "gradient_failures", "other_failures", "harness_errors", "bad_skips"):
        for line in res[key]:
            print(f"  {key[:-1] if key.endswith('s') else key}: {line}")
    for n in res["notes"]:
        print(f"  note: {n}")
    for p in res["problems"]:
        print(f"  PROBLEM: {p}")
    if res["incomplete"]:
        return 2
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
