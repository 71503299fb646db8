"""``lla-verify check``: replay one case from its one-line spec (as the audit prints it)
and judge it. Exit 0 within budget, 1 not, 2 usage error.
"""

from __future__ import annotations


from lla_verify.cliutil import UsageError
from lla_verify.audit.cell import run_cell_isolated
from lla_verify.audit.plan import Cell
from lla_verify.audit.run import EXIT_FAIL, EXIT_OK
from lla_verify.commands.audit import add_cell_timeout_arg, cell_timeout, resolve_op_impl, usage_errors_to_exit


def _case_error(exc) -> UsageError:
    return UsageError(f"--case: {str(exc).removeprefix('case: ').removeprefix('parallax case: ')}")


def _check_main(args) -> int:
    from lla_verify.registry.operators import get_operator
    from lla_contract import LLAInputError

    try:
        op = get_operator(args.op)
    except LLAInputError as exc:
        raise UsageError(str(exc)) from None
    if args.backward and not op.has_backward:
        raise UsageError(f"--backward: the {op.name} operator has no gradients to check (leave --backward out)")
    impl_spec = args.impl if args.impl is not None else op.default_impl
    args.impl = impl_spec
    try:
        case = op.parse_case(args.case)
    except LLAInputError as exc:
        raise _case_error(exc) from None
    impl = resolve_op_impl(op.name, impl_spec, args.device)  # LLA's through resolve_impl, as always
    reason = op.supports(impl, case)
    if reason:
        raise UsageError(f"--case: {reason}")
    from lla_verify.trust import Worker, picklable

    try:
        op.check_fits(case, args.device)
        op.build(case, args.device)  # a case that cannot be built is the user's error, said here
    except LLAInputError as exc:
        raise _case_error(exc) from None
    cell = Cell("check", case, op=op.name)
    worker = Worker(cell_timeout(args)) if picklable(impl, cell) else None
    try:
        # in a child process: an implementation that exits or hangs fails the check, it does not end it
        rec = run_cell_isolated(worker, cell, impl, args.device, backward=args.backward, impl_name=args.impl)
    except LLAInputError as exc:
        raise UsageError(f"--case: {exc}") from None
    finally:
        if worker is not None:
            worker.close()
    print(rec["message"])
    extras = [f"time {rec['time_s'] * 1e3:.1f} ms"]
    if rec.get("n_nan") or rec.get("n_inf"):
        extras.append(f"NaN {rec['n_nan']}, Inf {rec['n_inf']}")
    if "cg_iters_max" in rec:
        extras.append(f"CG iterations mean {rec['cg_iters_mean']:.1f} max {rec['cg_iters_max']}")
    if "cg_residual_max" in rec:
        extras.append(f"CG residual max {rec['cg_residual_max']:.2e}")
    print("  " + ", ".join(extras))
    g = rec.get("grad") or {}
    if args.backward:
        print(g.get("message") or f"gradients {g.get('status')}")
    return EXIT_OK if rec["passed"] else EXIT_FAIL


def register(sub) -> None:
    c = sub.add_parser("check", help="replay one case from its one-line spec and judge it (exit 0 pass, 1 fail)",
                       description="Rebuild one case from its spec (as printed by the audit), run the "
                                   "implementation, print the verdict. Exit 0 within budget, 1 not, 2 usage error.")
    c.add_argument("--case", required=True, metavar="SPEC",
                   help="e.g. 'spectrum:kappa=1e+06,rotate=1:B=1,H=1,S=48,D=16,dtype=float32,seed=0'; with --op "
                        "parallax or parallax-decode followed by ';probe=NAME[:p=v,...]'")
    c.add_argument("--op", default="lla", metavar="OPERATOR",
                   help="the operator the case and implementation are of: lla, parallax, lla-decode or "
                        "parallax-decode (default: lla; registry/operators.py)")
    c.add_argument("--impl", default=None, help="implementation, a built-in of the operator or MODULE:CALLABLE "
                   "(default: triton; parallax-triton, lla-decode-triton, parallax-decode-triton for the others)")
    c.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    c.add_argument("--backward", action="store_true", help="also check gradients (budget.check_backward; "
                   "budget.parallax.check_parallax_backward with --op parallax)")
    add_cell_timeout_arg(c)
    c.set_defaults(func=usage_errors_to_exit(_check_main))
