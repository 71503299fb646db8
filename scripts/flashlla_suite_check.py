"""Judge a property-suite run against the public FlashLLA from its JUnit XML.

The suite is expected to FAIL on the public kernel, and for its own defects only:

  - at least one forward-accuracy failure ("[flashlla] forward FAIL") and at least one
    gradient failure ("[flashlla] backward FAIL ... (dq, dk, dv only)");
  - every failure an assertion (AssertionError, or Hypothesis' groups and flaky reports
    of them): any other exception raised (an LLAInputError from the adapter above all), or a
    pytest error (setup, teardown, collection) is the harness's fault;
  - no skip but those the implementation record names (Impl.skips);
  - no failure in a property that does not call the implementation (the CG study of
    lla_triton, the oracle against mpmath).

    python scripts/flashlla_suite_check.py JUNIT.xml [--impl flashlla] [--pytest-rc N] [--json OUT]

Exit 0 when the run looks as expected, 1 when it does not, 2 when it is incomplete
(pytest interrupted, rc 2) or unreadable.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET

# properties that do not call the implementation under test (they check lla_triton's CG and
# the float64 oracle): a failure there is not the implementation's
NOT_THE_IMPL = ("test_cg_convergence", "test_oracle_vs_mp")
ALLOWED_EXC = {"AssertionError", "builtins.AssertionError", "ExceptionGroup", "BaseExceptionGroup",
               "FlakyFailure", "hypothesis.errors.FlakyFailure", "FlakyBackendFailure"}
# an exception name at the start of a failure line: "E   pkg.Name: ...", "  | Name: ...", "Name: ..."
EXC_RE = re.compile(r"^(?:E(?=\s))?[\s|+\-]*([A-Za-z_][\w.]*(?:Error|Exception|Failure|Group|Exit|Interrupt))(?::|\s*$)", re.M)


def exception_names(text: str) -> set[str]:
    return set(EXC_RE.findall(text))


def judge(xml_text: str, impl_skips: dict, *, pytest_rc: int | None = None, impl: str = "flashlla") -> dict:
    root = ET.fromstring(xml_text)
    res = {"tests": 0, "unnamed": 0, "passed": 0, "forward_failures": [], "gradient_failures": [], "other_failures": [],
           "harness_errors": [], "bad_skips": [], "record_skips": 0, "problems": [], "incomplete": False}
    allowed_skips = [r for r in impl_skips.values() if r]
    for tc in root.iter("testcase"):
        if not tc.get("name"):
            # pytest-xdist writes a name-less, result-less entry for reports it never
            # matched to a test (a run cut short): not a pass, and not a test
            res["unnamed"] += 1
            continue
        res["tests"] += 1
        tid = f"{tc.get('classname', '')}::{tc.get('name', '')}"
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
    if res["unnamed"]:
        res["problems"].append(f"{res['unnamed']} testcase entries without a name (not counted: a run cut short "
                               "leaves them)")
    if pytest_rc == 2:
        res["incomplete"] = True
        res["problems"].append("pytest was interrupted (rc 2): the run is incomplete")
    if pytest_rc == 0:
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
    ap.add_argument("junit")
    ap.add_argument("--impl", default="flashlla")
    ap.add_argument("--pytest-rc", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the judgement here")
    args = ap.parse_args(argv)
    from lla_verify.registry.impls import get_impl

    try:
        with open(args.junit) as fh:
            xml_text = fh.read()
        res = judge(xml_text, get_impl(args.impl).skips, pytest_rc=args.pytest_rc, impl=args.impl)
    except (OSError, ET.ParseError) as exc:
        print(f"suite check: cannot read {args.junit}: {exc}")
        return 2
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    print(f"suite check ({args.impl}): {res['tests']} tests ({res['unnamed']} unnamed entries not counted), "
          f"{res['passed']} passed, "
          f"{len(res['forward_failures'])} forward failures, {len(res['gradient_failures'])} gradient failures, "
          f"{len(res['other_failures'])} other assertion failures, {len(res['harness_errors'])} harness errors, "
          f"{res['record_skips']} skips named by the record, {len(res['bad_skips'])} other skips")
    for key in ("forward_failures", "gradient_failures", "other_failures", "harness_errors", "bad_skips"):
        for line in res[key]:
            print(f"  {key[:-1] if key.endswith('s') else key}: {line}")
    for p in res["problems"]:
        print(f"  PROBLEM: {p}")
    if res["incomplete"]:
        return 2
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
