"""The release audit: the plan's cells run one by one, a report of their verdicts.

The audit sweeps the case registry along the axes where LLA kernels break
(lla_verify/audit/plan.py). Each cell is one ``Case``: built, run through the
implementation, judged by ``budget.check_forward`` (and ``budget.check_backward``
when the implementation has gradients). The audit owns no oracle and no tolerance:
the verdicts, ratios and attributions are the budget module's.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import sys
import time
from dataclasses import dataclass

from lla_verify.audit.baseline import REGRESSION_FACTOR, REGRESSION_FLOOR, SCHEMA, compare, fmt_ratio, ratio_number
from lla_verify.audit.cell import NOT_RUN, run_cell_isolated
from lla_verify.audit.plan import Cell
from lla_verify.cliutil import jsonable


EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
@dataclass
class AuditResult:
    report: dict
    exit_code: int


def audit_verdict(cells: list[dict], regressions: list[dict], interrupted: str | None = None) -> dict:
    failed = [c for c in cells if not c.get("passed")]
    # a cell not run has no verdict: it fails the audit, but no ranking of ratios takes it
    ran = [c for c in cells if c.get("cause") != NOT_RUN]
    finite = [c for c in ran if c.get("ratio") is not None]
    worst = max(finite, key=lambda c: ratio_number(c["ratio"]) if not math.isnan(ratio_number(c["ratio"])) else math.inf,
                default=None)
    grads = [c["grad"] for c in cells if (c.get("grad") or {}).get("status") == "checked"]
    unchecked: dict[str, int] = {}
    for c in cells:
        st = (c.get("grad") or {}).get("status", "not checked")
        if st != "checked":
            # a reason's cell-specific tail (sizes, the case spec) is cut so that like reasons group
            key = re.sub(r" on [a-z_]+:\S*", "", st).split(" (")[0]
            unchecked[key] = unchecked.get(key, 0) + 1
    beyond = [c for c in cells if (c.get("grad") or {}).get("n_beyond_precision")]
    n_rows = sum(c["grad"]["n_beyond_precision"] for c in beyond)
    beyond_note = (f"; {len(beyond)} checked cells have rows beyond the compute precision (kappa u_c >= 1), "
                   f"{n_rows} query rows held to no budget (a NaN still fails)" if beyond else "")
    ops = {}
    for op in dict.fromkeys(c.get("op", "lla") for c in cells):
        cs = [c for c in cells if c.get("op", "lla") == op]
        w = max([c for c in cs if c.get("cause") != NOT_RUN] or cs, key=lambda c: ratio_number(c["ratio"]) if not math.isnan(ratio_number(c["ratio"])) else math.inf)
        ops[op] = {"n_cells": len(cs), "n_failed": sum(1 for c in cs if not c.get("passed")),
                   "worst_ratio": w["ratio"], "worst_spec": w["spec"], "worst_command": w["command"]}
    not_run = [c for c in cells if c.get("cause") == NOT_RUN]
    lost = [c["spec"] for c in cells if c.get("cuda_context_lost")]
    return {
        "operators": ops,
        "passed": not failed and not regressions and not interrupted,
        "interrupted": interrupted,
        "n_not_run": len(not_run),
        # an audit with cells not run is incomplete, like an interrupted one
        "not_run": (f"{len(not_run)} cells not run: the CUDA context of their process was lost in "
                    f"{', '.join(dict.fromkeys(c.get('not_run_after', '?') for c in not_run))}" if not_run else None),
        "cuda_context_lost": lost,
        "n_cells": len(cells), "n_failed": len(failed), "n_regressions": len(regressions),
        "worst_ratio": worst["ratio"] if worst else None, "worst_spec": worst["spec"] if worst else None,
        "worst_command": worst["command"] if worst else None,
        "causes": {k: sum(1 for c in failed if c.get("cause") == k) for k in sorted({c.get("cause") for c in failed})},
        "gradients_checked": len(grads),
        "gradients_unchecked": unchecked,
        "gradients_note": (f"gradients checked on {len(grads)} of {len(cells)} cells"
                           + "".join(f"; {n} {why}" for why, n in unchecked.items()) + beyond_note),
        "gradients_beyond_precision": len(beyond),
    }


def metadata(impl, device: str, mode: str, command: str, seed: int) -> dict:
    from lla_verify.environment import collect

    try:
        versions = collect()
    except Exception as exc:  # versions are context, never a reason to lose the audit
        versions = {"error": str(exc)}
    return {"impl": impl.name, "impl_description": impl.description, "device": device, "mode": mode,
            "seed": seed, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "versions": versions, "solver_tol": impl.solver_tol,
            "compute_dtype": str(impl.compute_dtype).replace("torch.", ""),
            # what the implementation rounds its inputs to and which gradients it is judged on
            "input_dtype": str(impl.input_dtype).replace("torch.", "") if impl.input_dtype else None,
            "grads": list(impl.grads) if impl.supports_grad else [],
            "grads_not_checked": {n: impl.skip_reason(n) for n in ("dq", "dk", "dv", "dlambda")
                                  if impl.supports_grad and n not in impl.grads},
            "regression_rule": f"forward or gradient ratio grew more than x{REGRESSION_FACTOR:g} to above "
                               f"{REGRESSION_FLOOR:g}, or a cell newly failing"}


def run_audit(impl, cells: list[Cell], *, device: str = "cpu", backward: bool = True,
              baseline: list[dict] | None = None, out: str | None = None, meta: dict | None = None,
              skipped: list[dict] | None = None, progress: bool = False, impl_name: str | None = None,
              log=None, factor: float = REGRESSION_FACTOR, floor: float = REGRESSION_FLOOR,
              isolate: bool = True, cell_timeout: float | None = None, dask_client=None,
              impl_ref: str | None = None) -> AuditResult:
    """Run ``cells`` on ``impl``; write report.json and report.html into ``out`` when given.

    With ``isolate`` (the default) the cells run one after another in a child process
    (trust.Worker), so that an implementation that exits, crashes or hangs fails its cell
    and the sweep goes on; ``cell_timeout`` bounds each of its calls (seconds, default
    trust.DEFAULT_CALL_TIMEOUT). An implementation that cannot be pickled (a closure)
    runs in this process, behind the same boundary but without those two protections.

    With ``dask_client`` each cell is a task on its cluster (audit/on_dask.py), run there
    as here; ``impl_ref`` (the CLI's --impl) lets the workers resolve the implementation
    by name. The report is the same, in plan order, each cell also saying which worker ran it.
    """
    from tqdm import tqdm

    from lla_verify.trust import DEFAULT_CALL_TIMEOUT, Worker, picklable

    # one implementation per operator: ``impl``, ``impl_name`` and ``impl_ref`` may be dicts
    # keyed by operator (registry/operators.py); a plain value is LLA's
    impls = impl if isinstance(impl, dict) else {"lla": impl}
    names = impl_name if isinstance(impl_name, dict) else {op: impl_name for op in impls}
    refs = impl_ref if isinstance(impl_ref, dict) else ({op: impl_ref for op in impls} if impl_ref else None)
    impl = impls.get("lla") or next(iter(impls.values()))
    impl_name = names.get("lla") if "lla" in impls else names.get(next(iter(impls)))
    t0 = time.perf_counter()
    done: dict[int, dict] = {}  # plan position in ``cells`` -> record
    # in a log (no terminal) a redraw every 0.1 s would bury the FAIL lines
    bar = tqdm(total=len(cells), desc=f"audit {impl_name or impl.name}", unit="cell", disable=not progress,
               file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    interrupted = None
    worker = None
    if dask_client is None and isolate and picklable(impls, cells):
        worker = Worker(cell_timeout if cell_timeout is not None else DEFAULT_CALL_TIMEOUT)
    # on Dask with impl_ref, each worker resolves the implementation by name and checks it there
    elif (isolate if dask_client is None else refs is None) and log is not None and not picklable(impls, cells):
        bad = [names.get(op) or i.name for op, i in impls.items() if not picklable(i)] or [impl_name or impl.name]
        print(f"lla-verify audit: {', '.join(bad)} cannot be pickled into a worker process; its cells run "
              "in this one (no protection against exit or hang)", file=log)

    def note(rec: dict) -> None:
        bar.set_postfix_str(rec["family"], refresh=False)
        bar.update(1)
        if not rec["passed"] and log is not None:
            op = rec.get("op", "lla")
            tqdm.write(f"FAIL {'' if op == 'lla' else op + ' '}{'+'.join(rec.get('failed_checks', []))} ratio "
                       f"{fmt_ratio(rec['ratio'])} ({rec['cause']}) {rec['spec']}", file=log)

    try:
        if dask_client is not None:
            from lla_verify.audit.on_dask import sweep

            sweep(dask_client, cells, impls, device, backward=backward, impl_name=names,
                  cell_timeout=cell_timeout if cell_timeout is not None else DEFAULT_CALL_TIMEOUT,
                  done=done, on_record=note, impl_ref=refs)
        else:
            for pos, cell in enumerate(cells):
                op = getattr(cell, "op", "lla")
                done[pos] = run_cell_isolated(worker, cell, impls[op], device, backward=backward,
                                              impl_name=names.get(op))
                note(done[pos])
    except KeyboardInterrupt:
        # Ctrl-C or a scheduler's SIGTERM: the cells done so far are evidence worth keeping;
        # the report says it is partial and the verdict cannot pass
        interrupted = f"interrupted after {len(done)} of {len(cells)} cells"
        if log is not None:
            print(f"lla-verify audit: {interrupted}; writing a partial report", file=log)
    finally:
        bar.close()
        if worker is not None:
            worker.close()
    records = [done[p] for p in sorted(done)]
    if interrupted and isinstance((meta or {}).get("cell_indices"), list):
        # on Dask the finished cells need not be the first ones: name exactly those (--merge reads it)
        meta = dict(meta, cell_indices=[meta["cell_indices"][p] for p in sorted(done)])
    regressions, binfo = (compare(records, baseline, factor=factor, floor=floor) if baseline is not None
                          else ([], None))
    report = {
        "schema": SCHEMA,
        "meta": dict(meta or {}, wall_s=time.perf_counter() - t0, interrupted=interrupted),
        "verdict": audit_verdict(records, regressions, interrupted=interrupted),
        "regressions": regressions,
        "baseline": binfo,
        "skipped": skipped or [],
        "cells": records,
    }
    report = jsonable(report)
    if out:
        from lla_verify.audit.report import write_reports

        write_reports(report, out)
    return AuditResult(report, EXIT_OK if report["verdict"]["passed"] else EXIT_FAIL)


def summary_lines(report: dict, *, top: int = 5) -> list[str]:
    """The stdout summary: regressions first, then the verdict, failures, worst cells."""
    from lla_verify.audit.report import wall_text

    v = report["verdict"]
    lines = []
    regs = report.get("regressions") or []
    if regs:
        lines.append(f"REGRESSIONS against the baseline: {len(regs)}")
        for r in regs:
            lines.append(f"  {r['why']}: {r['spec']}")
            lines.append(f"    {r['command']}")
    meta = report.get("meta", {})
    head = "PASS" if v["passed"] else "FAIL"
    lines.append(f"{head}: {v['n_failed']} out of {v['n_cells']} cells failed to pass the threshold (ratio > 1)"
                 f"{'; ' + str(len(regs)) + ' regressions' if regs else ''} "
                 f"[impl {meta.get('impl')}, device {meta.get('device')}, {meta.get('mode')}, "
                 f"{wall_text(meta)}]")
    if v.get("interrupted"):
        lines.append(f"INCOMPLETE: {v['interrupted']} (a partial audit never passes)")
    if v.get("not_run"):
        lines.append(f"INCOMPLETE: {v['not_run']} (a partial audit never passes; rerun them in a fresh process)")
    if v.get("cuda_context_lost"):
        lines.append(f"CUDA context lost (the kernel faulted on the device) in {len(v['cuda_context_lost'])} "
                     f"cells: {', '.join(v['cuda_context_lost'])}")
    if meta.get("cells_slice") and not meta.get("merged_from"):
        lines.append(f"slice {meta['cells_slice']} of a {meta.get('plan_size')}-cell plan: this verdict covers "
                     f"its cells only; the audit's is the merge of every slice (lla-verify audit --merge)")
    if v.get("worst_spec"):
        lines.append(f"worst ratio {fmt_ratio(v['worst_ratio'])} at {v['worst_spec']}")
    ops = v.get("operators") or {}
    if set(ops) - {"lla"}:
        impls = meta.get("impls") or {}
        for op, o in ops.items():
            lines.append(f"  {op} [{impls.get(op, '?')}]: {o['n_failed']} of {o['n_cells']} cells failed, "
                         f"worst ratio {fmt_ratio(o['worst_ratio'])}")
    failed = [c for c in report["cells"] if not c.get("passed")]
    for c in sorted(failed, key=lambda c: -ratio_number(c["ratio"]) if not math.isnan(ratio_number(c["ratio"])) else -math.inf):
        op = c.get("op", "lla")
        lines.append(f"  FAIL {'' if op == 'lla' else op + ' '}{'+'.join(c.get('failed_checks', []))} ratio "
                     f"{fmt_ratio(c['ratio'])} cause {c['cause']}: {c['spec']}")
        lines.append(f"    {c['command']}")
    if v.get("gradients_note"):
        lines.append(v["gradients_note"])
    if report.get("skipped"):
        lines.append(f"{len(report['skipped'])} cells skipped (reasons in report.json)")
    return lines
