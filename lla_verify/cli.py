"""The ``lla-verify`` command.

Each subcommand lives in its own module, which exposes ``register(subparsers)``
(adds its parser and sets ``func``); the table below is the only list of them.

Exit status, the same for every subcommand:
  0    success (every check within budget)
  1    a check failed (an implementation over budget, a regression, an incomplete audit)
  2    usage error: a bad argument, case spec, input file or output path (one line on stderr)
  3    internal error: an exception from lla-verify's own code, a bug to report; one line
       names it, and LLA_VERIFY_DEBUG=1 prints its traceback
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from lla_verify.cliutil import UsageError, one_line

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEBUG_ENV = "LLA_VERIFY_DEBUG"

# name -> module implementing it (imported lazily so ``info`` stays fast)
COMMANDS = {
    "info": "lla_verify.commands.info",
    "bench": "lla_verify.commands.bench",
    "bench-backward": "lla_verify.commands.bench_backward",
    "bench-parallax": "lla_verify.commands.bench_parallax",
    "bench-decode": "lla_verify.commands.bench_decode",
    "audit": "lla_verify.commands.audit",
    "check": "lla_verify.commands.check",
    "goldens": "lla_verify.commands.goldens",
    "cg": "lla_verify.commands.cg",
    "hunt": "lla_verify.commands.hunt",
    "suite": "lla_verify.commands.suite",
}


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: the error and where the usage is."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lla-verify",
        description="Verify Local Linear Attention kernels against float64 and mpmath oracles.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:  # not written yet: leave it out of the menu
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse's own usage errors exit 2 through SystemExit
    if not getattr(args, "func", None):
        print(f"lla-verify: error: expected a command: {', '.join(COMMANDS)} (see lla-verify --help)",
              file=sys.stderr)
        return EXIT_USAGE
    name = f"lla-verify {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"{name}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001  (the one place a stray exception becomes a status)
        # Not a usage error and not a verdict: a bug in lla-verify (an implementation's
        # own exceptions are caught where it is called and fail its check). Its name and
        # message stay visible; the traceback is one variable away.
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        msg = one_line(" ".join(str(exc).split()))
        print(f"{name}: internal error: {type(exc).__name__}: {msg[:500]} (a bug in lla-verify; rerun with "
              f"{DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
