"""``lla-verify goldens``: regenerate, check, compare against and list the goldens.

    regen [--dir D] [--force] [--check] [--only NAME...]
    compare --impl NAME [--device DEV] [--dir D] [--only NAME...]
    clean [--dir D]         delete the temporary files of an interrupted regen
    list

Exit status: 0 clean, 1 a check failed (or regen refused), 2 usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path


from lla_contract import LLAInputError
from lla_verify.goldens.catalog import CATALOG, select
from lla_verify.goldens.compare import compare
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


def _run_compare(args) -> int:
    from lla_verify.registry.impls import get_impl

    folder = Path(args.dir)
    from lla_verify.cliutil import UsageError, check_device

    try:
        select(args.only)
        impl = get_impl(args.impl)
        check_device(args.device)
    except LLAInputError as exc:
        return _usage(str(exc).replace("--lla-impl", "--impl"))
    except UsageError as exc:
        return _usage(str(exc))
    from lla_verify.registry.impls import is_available

    why = is_available(impl, args.device)
    if why:
        return _usage(f"--impl {args.impl}: not available on {args.device}: {why}")
    if not folder.is_dir():
        return _usage(f"--dir: {folder} is not a directory")
    try:
        code, _ = compare(folder, impl, device=args.device, only=args.only)
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
    for g in CATALOG:
        say(f"{g.name:<{width}}  {'mp' if g.mp else 'f64'}  {g.spec}")
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
    c.add_argument("--impl", required=True, help="a built-in implementation name or MODULE:CALLABLE")
    c.add_argument("--device", default="cpu", help="device to run the implementation on (default: cpu)")
    c.add_argument("--dir", default=str(DEFAULT_DIR), help="goldens folder (default: %(default)s)")
    c.add_argument("--only", nargs="+", metavar="NAME", help="only these goldens")
    c.set_defaults(func=_run_compare)

    cl = gs.add_parser("clean", help="delete the temporary files an interrupted regen left behind (nothing else)")
    cl.add_argument("--dir", default=str(DEFAULT_DIR), help="goldens folder (default: %(default)s)")
    cl.set_defaults(func=_run_clean)

    ls = gs.add_parser("list", help="the catalog: name, reference kind, spec")
    ls.set_defaults(func=_run_list)
