"""``lla-verify suite``: the property suite, installed with lla-verify, run by pytest.

    lla-verify suite --impl mypkg:fn [--parallax-impl NAME|MODULE:CALLABLE]
                     [--decode-impl NAME|MODULE:CALLABLE] [--parallax-decode-impl NAME|MODULE:CALLABLE]
                     [--device cpu|cuda|auto] [-- PYTEST_ARGS ...]

is ``python -m pytest -p lla_verify.testing.pytest_plugin --pyargs lla_verify_properties
--lla-impl mypkg:fn --lla-device ... PYTEST_ARGS`` run from the current folder, so a
module of that folder can be the implementation. The arguments after ``--`` go to
pytest as they are (``-- -n auto -k forward --hypothesis-profile gpu``).

Exit status is pytest's: 0 every test passed, 1 a property failed, 2 a usage error
(pytest's own 4) or a run pytest interrupted (its 2: a collection error, Ctrl-C),
3 pytest's internal error, 5 no test collected (e.g. a -k that matches nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

from lla_verify.testing.location import SUITE_PACKAGE, suite_dir

_PYTEST_USAGE_ERROR = 4
_USAGE_ERROR = 2


def _suite_args() -> list[str] | None:
    """How pytest is to find the suite: the installed package by name, else the source
    tree's folder (lla_verify imported from a checkout on PYTHONPATH); None: neither."""
    if importlib.util.find_spec(SUITE_PACKAGE) is not None:
        return ["--pyargs", SUITE_PACKAGE]
    src = suite_dir()
    return [str(src)] if (src / "__init__.py").is_file() else None


# the suite command's options for the other operators' implementations, and the plugin's
OTHER_IMPLS = (("parallax_impl", "--parallax-impl", "--lla-parallax-impl", "parallax"),
               ("decode_impl", "--decode-impl", "--lla-decode-impl", "lla-decode"),
               ("parallax_decode_impl", "--parallax-decode-impl", "--lla-parallax-decode-impl", "parallax-decode"))


def pytest_command(impl: str, device: str, pytest_args: list[str], parallax_impl: str | None = None,
                   decode_impl: str | None = None, parallax_decode_impl: str | None = None) -> list[str]:
    given = {"parallax_impl": parallax_impl, "decode_impl": decode_impl, "parallax_decode_impl": parallax_decode_impl}
    more = [x for attr, _, plugin_opt, _ in OTHER_IMPLS if given[attr] for x in (plugin_opt, given[attr])]
    return [sys.executable, "-m", "pytest", "-p", "lla_verify.testing.pytest_plugin", *(_suite_args() or []),
            "--lla-impl", impl, *more, "--lla-device", device, *pytest_args]


def _run(args: argparse.Namespace) -> int:
    from lla_verify.cliutil import UsageError
    from lla_verify.registry.impls import get_impl
    from lla_contract import LLAInputError

    if _suite_args() is None:
        raise UsageError(f"the suite package {SUITE_PACKAGE} is not installed "
                         f"(pip install lla-verify, or pip install -e . in the source tree)")
    # Resolved here first so that a bad --impl is one line and exit 2, not an error in
    # every test; from the current folder, as ``python -m pytest`` will import it.
    sys.path.insert(0, os.getcwd())
    try:
        get_impl(args.impl)
        from lla_verify.registry.operators import get_operator

        for attr, opt, _, op in OTHER_IMPLS:
            if getattr(args, attr):
                get_operator(op).resolve(getattr(args, attr), opt)
    except LLAInputError as exc:
        msg = str(exc).replace("--lla-impl", "--impl")
        for _, opt, plugin_opt, _ in OTHER_IMPLS:
            msg = msg.replace(plugin_opt, opt)
        raise UsageError(msg) from None
    finally:
        sys.path.remove(os.getcwd())
    rest = list(args.pytest_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    rc = subprocess.run(pytest_command(args.impl, args.device, rest, args.parallax_impl, args.decode_impl,
                                       args.parallax_decode_impl)).returncode
    return _USAGE_ERROR if rc == _PYTEST_USAGE_ERROR else rc


def register(sub) -> None:
    p = sub.add_parser(
        "suite", help="run the property suite (pytest) against an implementation",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--impl", required=True, help="implementation: built-in name or MODULE:CALLABLE")
    p.add_argument("--parallax-impl", default=None,
                   help="Parallax implementation for properties/test_parallax*.py: built-in name (parallax-dense, "
                        "parallax-oracle, parallax-triton, parallax-triton-bf16w) or MODULE:CALLABLE; "
                        "default parallax-dense")
    p.add_argument("--decode-impl", default=None,
                   help="LLA decode implementation for properties/test_decode.py: built-in name (lla-decode-triton, "
                        "lla-decode-keyed, lla-decode-oracle) or MODULE:CALLABLE; default lla-decode-triton")
    p.add_argument("--parallax-decode-impl", default=None,
                   help="Parallax decode implementation for properties/test_decode.py: built-in name "
                        "(parallax-decode-triton, parallax-decode-oracle) or MODULE:CALLABLE; default "
                        "parallax-decode-triton")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device the implementation runs on (auto: cuda if available)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST_ARGS",
                   help="passed to pytest as they are")
    p.set_defaults(func=_run)
