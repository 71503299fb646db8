"""Fixtures shared by the harness tests."""

import signal
import warnings

import pytest


@pytest.fixture
def sigint_as_a_shell_gives_it():
    """SIGINT with Python's default handler and unblocked, as in a process started from a
    shell: the tests of a real Ctrl-C need it, and in an xdist worker an earlier test may
    have left another disposition behind (two such tests saw their SIGINT vanish in a full
    run). Anything else found is named in a warning, so the test that left it shows up."""
    old = signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if old is not signal.default_int_handler or blocked:
        warnings.warn(f"SIGINT found with handler {old!r}{' and blocked' if blocked else ''}; "
                      "reset for this test", pytest.PytestWarning)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if blocked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
