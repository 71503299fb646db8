"""``lla-verify goldens``: regenerate, check, compare against and list the goldens.

    regen [--dir D] [--force] [--check] [--only NAME...]
    compare --impl NAME [--op OP|all] [--parallax-impl P] [--decode-impl L] [--parallax-decode-impl X]
            [--device DEV] [--dir D] [--only NAME...]
    clean [--dir D]         delete the temporary files of an interrupted regen
    list

``compare --op OP`` (default lla) judges ``--impl``, an implementation of OP, on OP's
goldens; ``--op all`` judges every operator's goldens, ``--impl`` being LLA's and the
others named by the audit's options (default: each operator's default implementation,
an operator whose default cannot run here left out with a note).

Exit status: 0 clean, 1 a check failed (or regen refused), 2 usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path


from lla_contract import LLAInputError
from lla_verify.goldens.catalog import CATALOG, select
from lla_verify.goldens.compare import compare_ops
from lla_verify.goldens.regen import say, check, clean, regen
from lla_verify.goldens.store import DEFAULT_DIR


def _usage(msg: str) -> int:
    from lla_verify.cliutil import one_line

    print(f"lla-verify goldens: error: {one_line(msg)}", file=sys.stderr)
    return 2


def _run_regen(args) -> int:
    folder = Path(args.dir)
    try:
        select(args.only)
    except LLAInputError as exc:
        return _usage(str(exc))
    if args.check and args.force:
        return _usage("--check and --force: --check writes nothing, drop one of them")
    if folder.exists() and not folder.is_dir():
        return _usage(f"--dir: {folder} is not a directory")
    if args.check:
        if not folder.is_dir():
            return _usage(f"--dir: {folder} does not exist")
        return check(folder, args.only)
    from lla_verify.cliutil import UsageError, check_out_dir

    try:
        check_out_dir(str(folder), "--dir")  # before the goldens are computed
    except UsageError as exc:
        return _usage(str(exc))
    return regen(folder, force=args.force, only=args.only)


# the option naming each other operator's implementation under --op all (the audit's)
OP_IMPL_OPTIONS = {"parallax": "--parallax-impl", "lla-decode": "--decode-impl",
                   "parallax-decode": "--parallax-decode-impl"}


def _lla_impl(spec: str, device: str):
    from lla_verify.registry.impls import get_impl, is_available

    impl = get_impl(spec)
    why = is_available(impl, device)
    if why:
        raise LLAInputError(f"--impl {spec}: not available on {device}: {why}")
    return impl


def _compare_impls(args) -> dict:
    """operator -> Impl for this compare; LLAInputError / UsageError on bad options."""
    from lla_verify.cliutil import UsageError
    from lla_verify.commands.audit import resolve_op_impl
    from lla_verify.registry.operators import OPERATORS, get_operator

    given = {op: getattr(args, opt.lstrip("-").replace("-", "_")) for op, opt in OP_IMPL_OPTIONS.items()}
    if args.op != "all":
        extra = [OP_IMPL_OPTIONS[op] for op, val in given.items() if val is not None]
        if extra:
            raise UsageError(f"{extra[0]}: only with --op all; with --op {args.op} the implementation is --impl")
        if args.op == "lla":
            return {"lla": _lla_impl(args.impl, args.device)}
        return {args.op: resolve_op_impl(args.op, args.impl, args.device, "--impl")}
    impls = {"lla": _lla_impl(args.impl, args.device)}
    for op in OPERATORS:
        if op == "lla":
            continue
        opt = OP_IMPL_OPTIONS[op]
        if given[op] is not None:
            impls[op] = resolve_op_impl(op, given[op], args.device, opt)
            continue
        try:  # the default implementation: left out with a note when it cannot run here
            impls[op] = resolve_op_impl(op, get_operator(op).default_impl, args.device, opt)
        except UsageError as exc:
            say(f"note: {op} goldens left out: {exc} (name one with {opt})")
    return impls


def _run_compare(args) -> int:
    from lla_verify.cliutil import UsageError, check_device
    from lla_verify.registry.operators import OPERATORS

    folder = Path(args.dir)
    if args.op != "all" and args.op not in OPERATORS:
        return _usage(f"--op: unknown operator {args.op!r}; expected 'all' or one of {list(OPERATORS)}")
    try:
        check_device(args.device)
        select(args.only, None if args.op == "all" else args.op)
        impls = _compare_impls(args)
    except LLAInputError as exc:
        return _usage(str(exc).replace("--lla-impl", "--impl"))
    except UsageError as exc:
        return _usage(str(exc))
    if not folder.is_dir():
        return _usage(f"--dir: {folder} is not a directory")
    try:
        code, _ = compare_ops(folder, impls, device=args.device, only=args.only)
    except (FileNotFoundError, ValueError) as exc:
        say(f"FAIL {exc}")
        return 1
    return code


def _run_clean(args) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        return _usage(f"--dir: {folder} is not a directory")
    return clean(folder)


def _run_list(args) -> int:
    width = max(len(g.name) for g in CATALOG)
    opw = max(len(g.op) for g in CATALOG)
    for g in CATALOG:
        say(f"{g.name:<{width}}  {g.op:<{opw}}  {'mp' if g.mp else 'f64'}  {g.spec}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("goldens", help="golden outputs: regenerate, check, and compare an implementation against them")
    gs = p.add_subparsers(dest="goldens_command", metavar="ACTION")
    p.set_defaults(func=lambda a: _usage("expected an action: regen, compare or list (see lla-verify goldens --help)"))

    r = gs.add_parser("regen", help="recompute every golden deterministically and write it (or --check)")
    r.add_argument("--dir", default=str(DEFAULT_DIR), help="goldens folder (default: %(default)s)")
    r.add_argument("--force", action="store_true", help="overwrite goldens whose values changed, printing the drift")
    r.add_argument("--check", action="store_true",
                   help="recompute in memory and report drift, hash mismatches, missing and extra files")
    r.add_argument("--only", nargs="+", metavar="NAME", help="only these goldens (see 'lla-verify goldens list')")
    r.set_defaults(func=_run_regen)

    c = gs.add_parser("compare", help="run an implementation on every golden and compare within derived budgets")
    c.add_argument("--impl", required=True, help="a built-in implementation of --op or MODULE:CALLABLE (with --op "
                                                 "all: LLA's)")
    c.add_argument("--op", default="lla", metavar="OPERATOR",
                   help="whose goldens: lla, parallax, lla-decode, parallax-decode, or all (default: lla; "
                        "registry/operators.py)")
    for op, opt in OP_IMPL_OPTIONS.items():
        c.add_argument(opt, default=None, metavar="IMPL",
                       help=f"with --op all: the {op} implementation, a built-in or MODULE:CALLABLE (default: the "
                            f"operator's default, left out with a note when it cannot run here)")
    c.add_argument("--device", default="cpu", help="device to run the implementation on (default: cpu)")
    c.add_argument("--dir", default=str(DEFAULT_DIR), help="goldens folder (default: %(default)s)")
    c.add_argument("--only", nargs="+", metavar="NAME", help="only these goldens")
    c.set_defaults(func=_run_compare)

    cl = gs.add_parser("clean", help="delete the temporary files an interrupted regen left behind (nothing else)")
    cl.add_argument("--dir", default=str(DEFAULT_DIR), help="goldens folder (default: %(default)s)")
    cl.set_defaults(func=_run_clean)

    ls = gs.add_parser("list", help="the catalog: name, operator, reference kind, spec")
    ls.set_defaults(func=_run_list)
