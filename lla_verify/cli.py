"""The ``lla-verify`` command.

Each subcommand lives in its own module, which exposes ``register(subparsers)``
(adds its parser and sets ``func``); the table below is the only list of them.
Exit status: 0 success, 1 a check failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module implementing it (imported lazily so ``info`` stays fast)
COMMANDS = {
    "info": "lla_verify.cmd_info",
    "bench": "lla_verify.bench",
    "audit": "lla_verify.audit",
    "goldens": "lla_verify.goldens",
    "cg": "lla_verify.cg_study",
    "hunt": "lla_verify.hunt",
    "suite": "lla_verify.cmd_suite",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
