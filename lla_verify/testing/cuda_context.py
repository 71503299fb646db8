"""Whether this process's CUDA context is lost, and which piece of work lost it.

A kernel that faults on the device (an illegal or misaligned address, a device-side
assert, a launch failure) leaves a sticky error: the process's CUDA context is dead and
every later CUDA call in the process raises the same error. Without a check the fault
surfaces at whatever runs next (the next test's ``t.to(device)``, the next audit cell)
and is blamed on it, so one defect reads as dozens. The harness therefore synchronises
after each piece of work on CUDA (``check``): a lost context is charged to the work that
just ran, and ``LOST`` remembers it so that the rest of the process reports its work as
not run instead of calling into CUDA again.

No function here initialises CUDA: a process that never used it has nothing to lose.
"""

from __future__ import annotations

import sys

# Fragments of the CUDA runtime's messages for the errors that poison a context
# (cudaErrorIllegalAddress, LaunchFailure, Assert, MisalignedAddress, IllegalInstruction,
# InvalidPc, HardwareStackError, LaunchTimeout, ECCUncorrectable). Out of memory and
# invalid-argument errors are not among them: the context survives those.
FATAL_FRAGMENTS = (
    "illegal memory access",
    "unspecified launch failure",
    "device-side assert",
    "misaligned address",
    "illegal instruction",
    "invalid program counter",
    "hardware stack error",
    "the launch timed out",
    "uncorrectable ecc error",
)

# (where the context was lost, the error) once a check found it lost in this process; the
# context stays dead for the process's life, so this is never cleared outside tests.
LOST: tuple[str, str] | None = None


def describe(exc: BaseException) -> str | None:
    """The error's first line when ``exc`` (or an exception it was raised from) is a CUDA
    error that loses the context, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        msg = str(exc)
        low = msg.lower()
        if "cuda" in low and any(f in low for f in FATAL_FRAGMENTS):
            first = next((line.strip() for line in msg.splitlines() if line.strip()), msg)
            return f"{type(exc).__name__}: {first}"
        exc = exc.__cause__ or exc.__context__
    return None


def _synchronize() -> None:
    """torch.cuda.synchronize(); the seam the tests replace to plant a fault."""
    import torch

    torch.cuda.synchronize()


def _cuda_in_use() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001  a torch without CUDA support: nothing to lose
        return False


def probe() -> str | None:
    """Synchronise the device and say how its context was lost, or None when it is alive
    (or CUDA was never initialised in this process). An error that does not lose the
    context is not this check's business: None."""
    if not _cuda_in_use():
        return None
    try:
        _synchronize()
    except Exception as exc:  # noqa: BLE001  only the context-losing errors are answered
        return describe(exc)
    return None


def check(where: str) -> str | None:
    """``probe()``, remembering the first loss in ``LOST`` as lost in ``where``; returns the
    error when the context was lost in ``where``, None otherwise (alive, or lost earlier)."""
    global LOST
    if LOST is not None:
        return None
    err = probe()
    if err is not None:
        LOST = (where, err)
    return err


def lost_in() -> str | None:
    """Where this process's context was lost, or None while it is alive (as far as known)."""
    return LOST[0] if LOST is not None else None


def _reset_for_tests() -> None:
    global LOST
    LOST = None


def guarded(where: str, work, *, not_run, raised, lost):
    """``work()`` with the context check around it, for a caller that runs one piece of
    work (a cell, a golden, a hunt point) per call in a process that may hold a CUDA
    context: ``not_run(place)`` answers when the context was lost earlier (at ``place``,
    and ``work`` is not called); ``raised(exc)`` answers a fault raised outside the
    implementation's own call (any other exception propagates); and when the check after
    the work finds the context lost, ``lost(result, error)`` answers with the work's
    result and the error."""
    place = lost_in()
    if place is not None:
        return not_run(place)
    try:
        result = work()
    except Exception as exc:
        if describe(exc) is None:
            raise
        result = raised(exc)
    err = check(where)
    return lost(result, err) if err is not None else result
