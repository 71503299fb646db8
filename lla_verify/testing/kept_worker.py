"""One trust.Worker child kept for many commands run in one test process.

Commands that run cells isolated (check, goldens compare, audit) each spawn a Worker
child: an interpreter that imports torch before its first cell. A test that runs many
such commands in process can hand them one kept child per call limit instead, as an
audit's cells share one: every cell still crosses the process boundary, runs in the
child and comes back through the same pipe. Not for tests of the Worker's own life
cycle (a child that exits, hangs or is replaced).
"""

from __future__ import annotations

import contextlib

import pytest


@contextlib.contextmanager
def kept_workers():
    from lla_verify import trust

    real = trust.Worker
    kept: dict = {}

    class Kept(real):
        def close(self):  # ended when the context exits
            pass

    def worker(call_limit=trust.DEFAULT_CALL_TIMEOUT, hard_limit=None):
        key = (call_limit, hard_limit)
        if key not in kept:
            kept[key] = Kept(call_limit, hard_limit)
        return kept[key]

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trust, "Worker", worker)
            yield
    finally:
        for w in kept.values():
            real.close(w)
