"""``lla-verify info``: versions, devices, and how Triton will run."""

from __future__ import annotations

from lla_verify.environment import collect


def _run(args) -> int:
    for key, val in collect().items():
        print(f"{key:>12}: {val}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, and whether Triton runs compiled or interpreted")
    p.set_defaults(func=_run)
