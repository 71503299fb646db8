"""``lla-verify audit``: the release audit from the command line, and ``--merge`` of its slices.

A failing cell is replayed by the one-line ``lla-verify check --case SPEC`` that
the report prints beside it.

Exit status: 0 every cell within budget and no regression, 1 otherwise, 2 usage
error (bad argument, unknown or unavailable implementation).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from functools import partial

from lla_verify.cliutil import UsageError, check_device, check_out_dir, one_line, seed_type
from lla_verify.audit.baseline import (REGRESSION_FACTOR, REGRESSION_FLOOR, cell_key, check_baseline_matches,
                                       load_baseline, plan_digest)
from lla_verify.audit.merge import cell_slice, merge_reports
from lla_verify.audit.plan import plan, plan_op
from lla_verify.audit.run import EXIT_FAIL, EXIT_OK, EXIT_USAGE, metadata, run_audit, summary_lines


def resolve_impl(impl_spec: str, device: str):
    """The Impl record, after the environment it needs; UsageError when it cannot run."""
    import torch  # noqa: F401

    from lla_verify.registry.impls import get_impl, is_available
    from lla_contract import LLAInputError

    check_device(device)
    if impl_spec == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # triton.jit decides compiled vs interpreted when lla_triton is imported, so the
        # variable must be set before that import; a process that already imported it
        # compiled would need a fresh interpreter.
        if "lla_triton" in sys.modules:
            raise UsageError("--impl triton on cpu: lla_triton was imported before TRITON_INTERPRET=1 could be set; "
                             "rerun as TRITON_INTERPRET=1 lla-verify ...")
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        impl = get_impl(impl_spec)
    except LLAInputError as exc:
        raise UsageError(str(exc).replace("--lla-impl", "--impl")) from None
    why = is_available(impl, device)
    if why:
        hint = "" if impl_spec == "torch-fp32" else " (--impl torch-fp32 runs everywhere)"
        raise UsageError(f"--impl {impl_spec}: not available on {device}: {why}{hint}")
    return impl


def resolve_op_impl(op_name: str, impl_spec, device: str, opt: str = "--impl"):
    """The Impl record of ``op_name``'s implementation ``impl_spec`` (registry/operators.py),
    after the environment it needs; UsageError naming ``opt`` when it is unknown or cannot run."""
    from lla_contract import LLAInputError
    from lla_verify.registry.operators import get_operator

    if op_name == "lla" and opt == "--impl":
        return resolve_impl(impl_spec, device)
    check_device(device)
    op = get_operator(op_name)
    why = op.prepare(impl_spec, device)
    if why:
        raise UsageError(f"{opt} {impl_spec}: not available on {device}: {why}")
    try:
        impl = op.resolve(impl_spec, opt)
    except LLAInputError as exc:
        raise UsageError(str(exc)) from None
    why = op.available(impl, device)
    if why:
        raise UsageError(f"{opt} {impl_spec}: not available on {device}: {why}")
    return impl


def _command_line(args, full: bool, device: str) -> str:
    """The audit's own invocation, rebuilt from the parsed arguments (argv may be a test's list)."""
    parts = ["lla-verify", "audit", "--impl", args.impl, "--device", device, "--full" if full else "--quick",
             "--seed", str(args.seed), "--out", args.out]
    for s in args.only or ():
        parts += ["--only", s]
    if args.ops is not None:
        parts += ["--ops", args.ops]
    for opt, val in (("--parallax-impl", args.parallax_impl), ("--decode-impl", args.decode_impl),
                     ("--parallax-decode-impl", args.parallax_decode_impl)):
        if val is not None:
            parts += [opt, val]
    if args.baseline:
        parts += ["--baseline", args.baseline]
        if args.regression_factor != REGRESSION_FACTOR or args.regression_floor != REGRESSION_FLOOR:
            parts += ["--regression-factor", f"{args.regression_factor:g}",
                      "--regression-floor", f"{args.regression_floor:g}"]
    if args.no_backward:
        parts.append("--no-backward")
    if args.max_cells is not None:
        parts += ["--max-cells", str(args.max_cells)]
    if args.cells:
        parts += ["--cells", args.cells]
    if getattr(args, "cell_timeout", None) is not None:
        parts += ["--cell-timeout", f"{args.cell_timeout:g}"]
    if args.dask is not None:
        parts += ["--dask"] + ([args.dask] if args.dask else [])
    if args.dask_workers is not None:
        parts += ["--dask-workers", str(args.dask_workers)]
    return " ".join(shlex.quote(p) for p in parts)


def _sigterm_as_interrupt(signum, frame):
    from lla_verify.trust import user_interrupt

    user_interrupt(signum, frame)  # marked as the user's: the trust boundary lets it stop the run


def _merge_main(args) -> int:
    command = "lla-verify audit --merge " + " ".join(shlex.quote(p) for p in args.merge) + (
        f" --baseline {shlex.quote(args.baseline)}" if args.baseline else "") + (
        f" --out {shlex.quote(args.out)}" if args.out else "")
    baseline = load_baseline(args.baseline) if args.baseline else None
    if args.out is not None:
        check_out_dir(args.out)
    report = merge_reports(args.merge, command, baseline=baseline, factor=args.regression_factor,
                           floor=args.regression_floor, baseline_path=args.baseline or "")
    if args.out:
        from lla_verify.audit.report import write_reports

        write_reports(report, args.out)
    return _print_summary(report, args.out)


def _print_summary(report: dict, out: str | None) -> int:
    """The stdout summary of a written report; returns its exit status."""
    for line in summary_lines(report):
        print(line)
    if out:
        print(f"report: {os.path.join(out, 'report.html')} and report.json")
    return EXIT_OK if report["verdict"]["passed"] else EXIT_FAIL


def _audit_main(args) -> int:
    import signal

    if not args.regression_factor >= 1.0:
        raise UsageError(f"--regression-factor: must be >= 1, got {args.regression_factor}")
    if not args.regression_floor >= 0.0:
        raise UsageError(f"--regression-floor: must be >= 0, got {args.regression_floor}")
    if args.merge:
        if args.dask is not None:
            raise UsageError("--dask: --merge runs no cell; leave --dask out")
        return _merge_main(args)
    if args.dask_workers is not None:
        if args.dask is None or args.dask:
            raise UsageError("--dask-workers: sizes the embedded cluster of a bare --dask (a running "
                             "scheduler's workers are its own)")
        if args.dask_workers < 1:
            raise UsageError(f"--dask-workers: must be >= 1, got {args.dask_workers}")
    if args.dask is not None:
        from lla_verify.audit.on_dask import require

        require()  # before anything runs: a missing extra is the user's to install

    # a batch scheduler's timeout (SIGTERM) ends the sweep like Ctrl-C: with a partial report
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)

    full = bool(args.full)
    device = args.device if args.device is not None else ("cuda" if full else "cpu")
    if args.max_cells is not None and args.max_cells < 1:
        raise UsageError(f"--max-cells: must be >= 1, got {args.max_cells}")
    ops = parse_ops(args.ops)
    baseline = load_baseline(args.baseline) if args.baseline else None
    impls, names, skipped_ops = resolve_audit_impls(args, ops, device)
    impl = impls.get("lla") or next(iter(impls.values()))
    if args.out is not None:
        check_out_dir(args.out)  # before the sweep: a bad --out found after it loses the run
    cells, skipped = [], list(skipped_ops)
    for op in impls:
        c_op, s_op = (plan if op == "lla" else partial(plan_op, op))(impls[op], full=full, seed=args.seed)
        cells += c_op
        skipped += s_op
    if args.only:
        cells = [c for c in cells if any(s in c.case.spec() for s in args.only)]
        if not cells:
            raise UsageError(f"--only: no cell matches {args.only}")
    plan_size = len(cells)
    digest = plan_digest(cell_key(c.case.spec(), c.op) for c in cells)
    indices = list(range(plan_size))
    if args.cells:
        indices = indices[cell_slice(args.cells, plan_size)]
    if args.max_cells is not None and len(indices) > args.max_cells:
        # evenly spaced, so every sweep keeps a few cells
        step = len(indices) / args.max_cells
        indices = [indices[int(i * step)] for i in range(args.max_cells)]
    cells = [cells[i] for i in indices]
    cells_start = indices[0]
    if baseline is not None:
        check_baseline_matches([cell_key(c.case.spec(), c.op) for c in cells], baseline, args.baseline)
    from lla_contract import LLAInputError
    from lla_verify.registry.operators import OPERATORS

    for c in cells:
        try:
            OPERATORS[c.op].check_fits(c.case, device)
        except LLAInputError as exc:
            raise UsageError(f"cell {c.case.spec()}: {str(exc).removeprefix('case: ')} (--only or --cells "
                             f"leave it out)") from None
    command = _command_line(args, full, device)
    meta = metadata(impl, device, "full" if full else "quick", command, args.seed)
    meta["impl"] = names.get("lla") or next(iter(names.values()))
    if set(impls) != {"lla"}:
        meta["impls"] = dict(names)  # the implementation of each operator audited
        meta["ops"] = list(impls)
    meta["plan_size"] = plan_size  # cells planned before --cells: what --merge checks completeness against
    meta["plan_digest"] = digest  # and what a complete merge's cells must hash to
    meta["cell_indices"] = indices  # the plan position of each cell run, in order
    meta["only"] = list(args.only or [])
    meta["cells_slice"] = args.cells or None
    meta["cells_start"] = cells_start  # the slice's first plan position: --merge orders by it
    meta["regression_rule"] = (f"forward or gradient ratio grew more than x{args.regression_factor:g} to above "
                               f"{args.regression_floor:g}, or a cell newly failing")
    on = f"on {meta['impl']}" if set(impls) == {"lla"} else "(" + ", ".join(
        f"{op} {sum(1 for c in cells if c.op == op)} on {names[op]}" for op in impls) + ")"
    print(f"lla-verify audit: {len(cells)} cells {on} ({device}, {'full' if full else 'quick'})"
          f"{', ' + str(len(skipped)) + ' skipped' if skipped else ''}", file=sys.stderr)
    for s in skipped_ops:
        print(f"lla-verify audit: operator {s['op']} left out: {s['reason']}", file=sys.stderr)
    if set(impls) == {"lla"}:
        impls, names = impls["lla"], names["lla"]  # the LLA audit as it always ran
    run = dict(device=device, backward=not args.no_backward, baseline=baseline, out=args.out, meta=meta,
               skipped=skipped, progress=not args.no_progress, impl_name=names, log=sys.stderr,
               factor=args.regression_factor, floor=args.regression_floor, cell_timeout=cell_timeout(args))
    if args.dask is None:
        return _print_summary(run_audit(impls, cells, **run).report, args.out)
    from lla_verify.audit.on_dask import check_workers, session

    with session(args.dask or None, device, args.dask_workers) as (client, info):
        check_workers(client)
        meta["dask"] = info
        where = (f"a local cluster of {info['workers_at_start']} workers" if info["embedded"]
                 else f"the scheduler at {info['scheduler']} ({info['workers_at_start']} workers now)")
        print(f"lla-verify audit: on Dask, {where}", file=sys.stderr)
        res = run_audit(impls, cells, dask_client=client, impl_ref=names, **run)
        # the summary before the cluster's few seconds of shutdown, which an interrupt may cut short
        return _print_summary(res.report, args.out)


# the audit option naming each operator's implementation (LLA's is --impl)
IMPL_OPTIONS = {"parallax": ("parallax_impl", "--parallax-impl"), "lla-decode": ("decode_impl", "--decode-impl"),
                "parallax-decode": ("parallax_decode_impl", "--parallax-decode-impl")}


def parse_ops(text) -> list[str] | None:
    """--ops: a comma-separated list of operators, or 'all'; None (not given) is every operator."""
    from lla_verify.registry.operators import OPERATOR_NAMES

    if text is None:
        return None
    names = [t.strip() for t in text.split(",")]
    if names == ["all"]:
        return list(OPERATOR_NAMES)
    bad = [n for n in names if n not in OPERATOR_NAMES]
    if bad or not names:
        raise UsageError(f"--ops: expected a comma-separated list of {list(OPERATOR_NAMES)} or 'all', got {text!r}")
    return [n for n in OPERATOR_NAMES if n in names]


def resolve_audit_impls(args, ops: list[str] | None, device: str) -> tuple[dict, dict, list]:
    """The implementation of each audited operator: (impls, names, operators left out).

    ``ops`` None (no --ops): every operator, but one whose default implementation cannot run
    here is left out with its reason (a machine without Triton still audits LLA with
    --impl torch-fp32); an operator named in --ops, or given an implementation, must run."""
    from lla_verify.registry.operators import OPERATOR_NAMES, get_operator

    chosen = ops if ops is not None else list(OPERATOR_NAMES)
    impls, names, left_out = {}, {}, []
    for op, (attr, opt) in IMPL_OPTIONS.items():
        if getattr(args, attr) is not None and op not in chosen:
            raise UsageError(f"{opt}: the {op} operator is not in --ops {args.ops!r} (add it, or leave {opt} out)")
    for op in chosen:
        if op == "lla":
            impls[op], names[op] = resolve_impl(args.impl, device), args.impl
            continue
        attr, opt = IMPL_OPTIONS[op]
        given = getattr(args, attr)
        spec = given if given is not None else get_operator(op).default_impl
        try:
            impls[op] = resolve_op_impl(op, spec, device, opt)
        except UsageError as exc:
            if ops is not None or given is not None:
                raise
            left_out.append({"spec": "*", "op": op, "reason": f"{exc} (no --ops: left out)"})
            continue
        names[op] = spec
    if not impls:
        raise UsageError("--ops: no operator left to audit")
    return impls, names, left_out


def cell_timeout(args) -> float:
    from lla_verify.trust import DEFAULT_CALL_TIMEOUT

    t = getattr(args, "cell_timeout", None)
    t = DEFAULT_CALL_TIMEOUT if t is None else t
    if not (t > 0 and math.isfinite(t)):
        raise UsageError(f"--cell-timeout: expected a positive number of seconds, got {t:g}")
    return float(t)


def add_cell_timeout_arg(p) -> None:
    p.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                   help="each call of the implementation may take this long before its cell fails as timed out "
                        "(default 300)")


def usage_errors_to_exit(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except UsageError as exc:
            print(f"lla-verify {args.command}: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE

    return run


def register(sub) -> None:
    p = sub.add_parser(
        "audit", help="the release audit: sweep kappa, bandwidth, lambda and every case family; HTML + JSON report",
        description="Sweep the case registry over kappa, scale x lambda, lambda, every SPEC 7 family and awkward "
                    "shapes; judge each cell against its derived budget; write report.html and report.json. "
                    "Exit 0 all within budget, 1 a cell over budget or a regression, 2 usage error.")
    p.add_argument("--impl", default="triton", help="implementation: triton, torch-fp32, oracle-f64, flashlla or "
                   "MODULE:CALLABLE (default: triton)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu for --quick, cuda for --full)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes on CPU, minutes (the default)")
    mode.add_argument("--full", action="store_true", help="GPU sizes: S up to 4096, D 64 and 128, ~150 cells")
    p.add_argument("--baseline", metavar="REPORT_JSON", help="an earlier report.json: regressions fail the audit")
    p.add_argument("--out", default="report", metavar="DIR", help="directory for report.html and report.json "
                   "(default: ./report)")
    p.add_argument("--regression-factor", type=float, default=REGRESSION_FACTOR, metavar="X",
                   help="with --baseline: a ratio growing more than X times is a regression "
                        f"(default {REGRESSION_FACTOR:g})")
    p.add_argument("--regression-floor", type=float, default=REGRESSION_FLOOR, metavar="R",
                   help="with --baseline: growth to a ratio below R is rounding noise, not a regression "
                        f"(default {REGRESSION_FLOOR:g})")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of every case (default 0)")
    p.add_argument("--only", action="append", metavar="SUBSTRING",
                   help="keep only cells whose case spec contains SUBSTRING (repeatable)")
    p.add_argument("--no-backward", action="store_true", help="skip the gradient checks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-cells", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cells", default=None, metavar="START:STOP",
                   help="run a slice of the plan (to finish an interrupted audit, or split one across machines)")
    p.add_argument("--merge", nargs="+", default=None, metavar="REPORT",
                   help="merge the report.json files of slices of one audit into one report (no cell is run)")
    p.add_argument("--dask", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run each cell as a task on Dask: alone, an embedded local cluster (one worker per visible "
                        "GPU with --device cuda, else per CPU); with ADDRESS (tcp://host:8786 or a scheduler "
                        "file *.json) a running scheduler. Needs the extra: pip install 'lla-verify[dask]'")
    p.add_argument("--dask-workers", type=int, default=None, metavar="N",
                   help="with a bare --dask: the embedded cluster's worker count (GPUs shared round-robin)")
    p.add_argument("--ops", default=None, metavar="OP[,OP...]",
                   help="the operators to audit, comma-separated: lla, parallax, lla-decode, parallax-decode, or all "
                        "(default: all; one whose default implementation cannot run here is left out, with a note)")
    p.add_argument("--parallax-impl", default=None, metavar="IMPL",
                   help="the Parallax implementation: parallax-triton, parallax-triton-bf16w, parallax-dense, "
                        "parallax-oracle or MODULE:CALLABLE fn(q, k, v, r, *, qk_scale) (default: parallax-triton)")
    p.add_argument("--decode-impl", default=None, metavar="IMPL",
                   help="the LLA decode implementation: lla-decode-triton, lla-decode-keyed, lla-decode-oracle or "
                        "MODULE:CALLABLE fn(q, k_cache, v_cache, lengths, *, ridge_lambda, qk_scale) "
                        "(default: lla-decode-triton)")
    p.add_argument("--parallax-decode-impl", default=None, metavar="IMPL",
                   help="the Parallax decode implementation: parallax-decode-triton, parallax-decode-oracle or "
                        "MODULE:CALLABLE fn(q, r, k_cache, v_cache, lengths, *, qk_scale) "
                        "(default: parallax-decode-triton)")
    add_cell_timeout_arg(p)
    p.set_defaults(func=usage_errors_to_exit(_audit_main))
