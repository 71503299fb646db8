"""The trust boundary: every call of an implementation under test goes through here.

The implementation is code we are judging, so the harness assumes nothing of it
(docs/trust.md; STYLE.md, "Evaluators that were fooled"):

- it gets fresh copies of q, k, v and lambda, at addresses no other recent call was
  given (a cache keyed on ``data_ptr()`` cannot replay an earlier result), and the
  copies and the harness's originals are compared bit for bit with a snapshot after
  the call: a change is :class:`Misbehaved` "modified its inputs", naming the tensor;
- it must return an exact ``torch.Tensor`` (no subclass, no lazy wrapper) of the
  expected shape, a floating dtype we expect and the inputs' device; the harness
  judges a synchronised, contiguous copy of it, never the object it returned;
- ``SystemExit``, and a ``KeyboardInterrupt`` that no signal delivered, raised by the
  implementation are :class:`Misbehaved` too; a real Ctrl-C (SIGINT) or a
  scheduler's SIGTERM still stops the run;
- freed memory is poisoned with NaN before the call, so that ``torch.empty`` inside
  the implementation does not hand back a freed reference output;
- :class:`Worker` runs whole cells in a child process (spawn) so that ``os._exit``, a
  crash or a hang ends the cell, not the run: a call running past its time limit
  becomes "timed out after N s".

What it cannot do is in docs/trust.md.
"""

from __future__ import annotations

import collections
import ctypes
import math
import multiprocessing
import os
import pickle
import signal
import threading
import time

import torch

# Clocks captured at import: an implementation that patches time.perf_counter (or
# time.monotonic) after this module is loaded does not change the harness's clock.
_perf_counter = time.perf_counter
_monotonic = time.monotonic


def clock() -> float:
    """Seconds, from the perf_counter captured when the harness was imported."""
    return _perf_counter()


DEFAULT_CALL_TIMEOUT = 300.0  # seconds one call of the implementation may take in a worker
EXIT_TIMEOUT = 113  # a worker's exit status when its watchdog ended a call past its limit
POISON_BLOCKS = 8  # freed blocks of each output size poisoned on a GPU before a call (see poison())
POISON_BLOCKS_CPU = 4  # the same on a CPU heap, per round
POISON_ROUNDS_CPU = 4  # allocate-fill-free rounds on a CPU heap (see poison())
_M_PERTURB = -6  # glibc mallopt's parameter number (malloc.h)
_PERTURB_BYTE = 0xFF  # freed bytes become 0xff (NaN); fresh allocations 0x00


class Misbehaved(Exception):
    """The implementation broke the calling contract; str() is the reason, e.g.
    "modified its inputs: v (16 of 256 elements changed)". A failed verdict, never a pass."""


# ------------------------------------------------------------------ interrupts
# A KeyboardInterrupt is the user's only when a signal delivered it: the handlers below
# mark it before raising, and one raised by the implementation's own code is unmarked.
_SIGNALLED = threading.Event()


def user_interrupt(signum=None, frame=None):
    """Signal handler (SIGINT, SIGTERM): a genuine interrupt of the run."""
    _SIGNALLED.set()
    raise KeyboardInterrupt


class _InterruptGuard:
    """Installs user_interrupt on SIGINT for the duration of a call (main thread only)."""

    def __enter__(self):
        _SIGNALLED.clear()
        self.old = None
        if threading.current_thread() is threading.main_thread():
            cur = signal.getsignal(signal.SIGINT)
            if cur is signal.default_int_handler:  # leave a caller's own handler (or SIG_IGN) alone
                self.old = cur
                signal.signal(signal.SIGINT, user_interrupt)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


def _reason_for(exc: BaseException) -> str | None:
    """The misbehaviour a BaseException from the implementation stands for, or None to re-raise it."""
    if isinstance(exc, SystemExit):
        return f"raised SystemExit({exc.code!r}) (tried to end the process)"
    if isinstance(exc, KeyboardInterrupt):
        if _SIGNALLED.is_set():
            return None  # the user's Ctrl-C or a scheduler's SIGTERM: stop the run
        return "raised KeyboardInterrupt itself (no interrupt signal was delivered)"
    if isinstance(exc, GeneratorExit):
        return "raised GeneratorExit"
    return None


# ------------------------------------------------------------------ inputs
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t as integers of the same width: equality of these is bitwise (NaN == NaN, -0 != +0)."""
    t = t.detach().contiguous()
    if t.is_complex() or t.element_size() not in _INT_VIEW:
        return t
    return t.view(_INT_VIEW[t.element_size()])


def _n_changed(before: torch.Tensor, after: torch.Tensor) -> str:
    if after.shape != before.shape or after.dtype != before.dtype:
        return f"now shape {tuple(after.shape)} dtype {after.dtype}, was {tuple(before.shape)} {before.dtype}"
    n = int((_bits(before) != _bits(after.to(before.device))).sum())
    return f"{n} of {before.numel()} elements changed"


def _same(before: torch.Tensor, after: torch.Tensor) -> bool:
    return (after.shape == before.shape and after.dtype == before.dtype and after.device == before.device
            and torch.equal(_bits(before), _bits(after)))


# The inputs handed to the last calls stay alive until the next call has its own, so
# consecutive calls never share an input address; and a fresh copy that lands on an
# address handed out in the last HANDED_MEMORY calls is reallocated (the clash held
# alive meanwhile), so that a cache keyed on data_ptr() misses instead of replaying.
HANDED_MEMORY = 64
_RECENT: collections.deque = collections.deque(maxlen=2)
_HANDED: collections.deque = collections.deque(maxlen=HANDED_MEMORY)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t.detach())
    return out


def _hand_over(named: dict) -> dict:
    """Fresh contiguous copies of the tensor inputs, at addresses none of the recent calls got."""
    taken = set().union(*_HANDED) if _HANDED else set()
    out, hold = {}, []
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            out[name] = t
            continue
        c = _fresh(t)
        for _ in range(16):
            if c.numel() == 0 or c.data_ptr() not in taken:
                break
            hold.append(c)
            c = _fresh(t)
        out[name] = c
    del hold
    ptrs = frozenset(t.data_ptr() for t in out.values() if isinstance(t, torch.Tensor) and t.numel())
    _HANDED.append(ptrs)
    _RECENT.append(out)
    return out


# ------------------------------------------------------------------ freed memory
def poison(device, numel: int) -> None:
    """Fill the freed blocks an output of ``numel`` elements would be cut from with NaN.

    A kernel that returns ``torch.empty`` memory must not receive a freed reference
    output (KernelBench PR 82). Blocks of the output's size at 2, 4 and 8 bytes an
    element (bf16/fp16, fp32, fp64), several of each alive at once, are filled with
    all-ones bytes (NaN in every float format) and freed, so that the free blocks of
    those sizes, a freed reference among them, now hold NaN.

    CUDA's caching allocator hands a request the best-fitting free block of its pool, so
    one round of POISON_BLOCKS per size reaches a freed reference. glibc's malloc does
    not: a chunk freed a moment ago waits in the unsorted bin, and a request of its size
    may be served from elsewhere while that pass only files the chunk into its size bin;
    a later request of the size then gets it. On a fragmented heap one round leaves about
    one freed block in ten intact, so the CPU path repeats the round POISON_ROUNDS_CPU
    times (tests/test_trust.py fragments a heap and measures it).
    """
    dev = torch.device(device)
    numel = max(int(numel), 4)
    count, rounds = (POISON_BLOCKS, 1) if dev.type == "cuda" else (POISON_BLOCKS_CPU, POISON_ROUNDS_CPU)
    for _ in range(rounds):
        blocks = [torch.full((numel * size,), 255, dtype=torch.uint8, device=dev)
                  for size in (8, 4, 2) for _ in range(count)]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the fills land before the blocks can be reused
        del blocks


def _find_mallopt():
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no glibc (macOS, Windows): poison() alone
        return None


_MALLOPT = _find_mallopt()


class FreshHeap:
    """Within it, CPU memory the implementation allocates does not hold what was freed before.

    poison() makes recovering a freed block unlikely; on glibc this makes it impossible:
    mallopt(M_PERTURB) has malloc fill every block it hands out with one byte (0x00 here,
    so ``torch.empty`` returns zeros) and every block freed with its complement (NaN). It
    costs a memset per allocation, so it is on only while the implementation runs.
    ``active`` says whether it took effect (glibc and a CPU device).
    """

    def __init__(self, device, *, enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled
        self.active = False

    def __enter__(self):
        if self.enabled and self.device.type == "cpu" and _MALLOPT is not None:
            self.active = _MALLOPT(_M_PERTURB, _PERTURB_BYTE) == 1
        return self

    def __exit__(self, *exc):
        if self.active:
            _MALLOPT(_M_PERTURB, 0)
        return False


# ------------------------------------------------------------------ outputs
def check_tensor(x, what: str, *, shape: tuple, dtypes: tuple, device: torch.device) -> torch.Tensor:
    """``x`` if it is a plain tensor of ``shape``, one of ``dtypes``, on ``device``; else Misbehaved."""
    if type(x) is not torch.Tensor:
        kind = type(x).__name__
        if isinstance(x, torch.Tensor):
            raise Misbehaved(f"returned a {kind} (a torch.Tensor subclass) as {what}; a plain torch.Tensor is required")
        if isinstance(x, (list, tuple)):
            kind += f" of length {len(x)}"
        raise Misbehaved(f"returned {kind} as {what}, not a torch.Tensor")
    if x.layout != torch.strided:
        raise Misbehaved(f"returned a {x.layout} tensor as {what}; a dense (strided) tensor is required")
    if tuple(x.shape) != tuple(shape):
        raise Misbehaved(f"returned {what} of shape {tuple(x.shape)}, expected {tuple(shape)}")
    if x.dtype not in dtypes:
        raise Misbehaved(f"returned {what} of dtype {x.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    if x.device != device:
        raise Misbehaved(f"returned {what} on {x.device}, expected {device} (the inputs' device)")
    return x


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # every stream: work left on a side stream is finished first


def materialise(x: torch.Tensor) -> torch.Tensor:
    """A synchronised, contiguous copy owned by the harness."""
    _sync(x.device)
    y = x.detach().clone(memory_format=torch.contiguous_format)
    _sync(x.device)
    return y


def _output_dtypes(q: torch.Tensor) -> tuple:
    # the protocol's q dtype; float64 carries strictly more and is judged at its own rounding
    return (q.dtype,) if q.dtype == torch.float64 else (q.dtype, torch.float64)


# ------------------------------------------------------------------ the calls
# The real os._exit, for the worker's watchdog: during a guarded call os._exit is replaced
_REAL_EXIT = os._exit


class _ExitCalled(BaseException):
    """os._exit called by the implementation during a guarded call."""


def _refuse_exit(status=0):
    raise _ExitCalled(status)


class _CallTimedOut(BaseException):
    """The guarded call ran past CALL_LIMIT (signalled by SIGALRM in the main thread)."""


# Seconds a guarded call may run in this process before it fails as timed out (None: no
# limit). The property suite sets it (--lla-call-timeout); check, audit, hunt and goldens
# run their calls in a Worker, whose watchdog ends the child instead.
CALL_LIMIT: float | None = None


class _ExitGuard:
    """os._exit raises instead of ending the process, and, in the main thread with
    CALL_LIMIT set, a SIGALRM timer interrupts a call that runs past it. A hang inside
    native code that never returns to Python is beyond a signal: only a child process
    (Worker) ends that."""

    _timing = False  # a timer is running: a nested guarded call keeps the outer one's

    def __enter__(self):
        self.prev_exit, os._exit = os._exit, _refuse_exit
        self.old_alarm = None
        if (CALL_LIMIT and _WATCH["limit"] is None and not _ExitGuard._timing
                and threading.current_thread() is threading.main_thread()):
            def on_alarm(signum, frame):
                raise _CallTimedOut()

            self.old_alarm = signal.signal(signal.SIGALRM, on_alarm)
            _ExitGuard._timing = True
            signal.setitimer(signal.ITIMER_REAL, CALL_LIMIT)
        return self

    def __exit__(self, *exc):
        os._exit = self.prev_exit
        if self.old_alarm is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old_alarm)
            _ExitGuard._timing = False
        return False


# Callables that ran past CALL_LIMIT in this process, with the limit they broke. Hypothesis
# replays and shrinks a failing example many times; a hung implementation is not called
# again, so a property fails in one limit's time instead of one per replay.
_TIMED_OUT: dict = {}


def _guarded(fn, *args, **kw):
    """fn(*args, **kw) with the implementation's own SystemExit / KeyboardInterrupt, its
    os._exit and (CALL_LIMIT) a call past the limit as Misbehaved."""
    try:
        broken = _TIMED_OUT.get(fn)
    except TypeError:  # an unhashable callable is simply called
        broken = None
    if broken is not None:
        raise Misbehaved(f"timed out after {broken:g} s on an earlier call in this process (not called again)")
    with _InterruptGuard(), _ExitGuard():
        try:
            return fn(*args, **kw)
        except _ExitCalled as exc:
            raise Misbehaved(f"called os._exit({exc.args[0]!r}) (tried to end the process)") from None
        except _CallTimedOut:
            try:
                _TIMED_OUT[fn] = CALL_LIMIT
            except TypeError:
                pass
            raise Misbehaved(f"timed out after {CALL_LIMIT:g} s") from None
        except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
            why = _reason_for(exc)
            if why is None:
                raise
            raise Misbehaved(why) from None


class _Watch:
    """Marks a call in progress for the worker's watchdog (no effect outside a worker)."""

    def __enter__(self):
        _WATCH["since"] = _monotonic()

    def __exit__(self, *exc):
        _WATCH["since"] = None
        return False


_WATCH: dict = {"since": None, "limit": None}


def _inputs(q, k, v, ridge_lambda) -> dict:
    return {"q": q, "k": k, "v": v, "ridge_lambda": ridge_lambda}


def _check_inputs(snapshot: dict, originals: dict, handed: dict) -> None:
    for name, before in snapshot.items():
        if not _same(before, handed[name]):
            raise Misbehaved(f"modified its inputs: {name} ({_n_changed(before, handed[name])})")
        if not _same(before, originals[name]):
            raise Misbehaved(f"modified the harness's copy of its inputs: {name} "
                             f"({_n_changed(before, originals[name])})")


def call_impl(fn, args: dict, kwargs: dict, *, out_shape: tuple, like: torch.Tensor, with_stats: bool = False,
              stats_lead: tuple | None = None, poison_memory: bool = True):
    """``fn(*args.values(), **kwargs)`` across the boundary; returns (o, stats or None).

    The one calling discipline of every operator (LLA's forward, Parallax, the decodes):
    each tensor of ``args`` and ``kwargs`` is handed over as a fresh copy and compared with
    a snapshot after the call; the output must be a plain tensor of ``out_shape``, of
    ``like``'s dtype (or float64), on its device, and is returned as the harness's own
    synchronised copy. With ``with_stats`` ``fn`` returns (o, stats dict); the stats kept
    are the plain tensors of shape ``stats_lead`` on that device. Raises Misbehaved for
    any breach of the contract; an ordinary exception of the implementation propagates
    unchanged (callers report it as a crash).
    """
    originals = dict(args, **kwargs)
    snapshot = {n: t.detach().clone() for n, t in originals.items() if isinstance(t, torch.Tensor)}
    handed = _hand_over(originals)
    device = like.device
    if poison_memory:
        poison(device, math.prod(out_shape))
    with torch.no_grad(), _Watch(), FreshHeap(device, enabled=poison_memory):
        _sync(device)
        out = _guarded(fn, *(handed[n] for n in args), **{n: handed[n] for n in kwargs})
        _sync(device)
    st = None
    if with_stats:
        if type(out) is not tuple or len(out) != 2:
            raise Misbehaved(f"forward_with_stats returned {type(out).__name__}, expected a tuple (o, stats)")
        out, st = out
        if st is not None and not isinstance(st, dict):
            raise Misbehaved(f"forward_with_stats returned stats of type {type(st).__name__}, expected a dict")
    _check_inputs(snapshot, originals, handed)
    o = check_tensor(out, "the output o", shape=tuple(out_shape), dtypes=_output_dtypes(like), device=device)
    o = materialise(o)
    if st is not None:
        # statistics only attribute a failure (solver or implementation); what is not a
        # plain per-query tensor is left out rather than trusted
        lead = tuple(stats_lead)
        st = {key: materialise(val) for key, val in st.items()
              if type(val) is torch.Tensor and tuple(val.shape) == lead and val.device == device}
    return o, st


def call_forward(impl, q, k, v, *, ridge_lambda, qk_scale, stats: bool = False, poison_memory: bool = True):
    """Run ``impl``'s LLA forward across the boundary (``call_impl``); returns (o, stats or None).

    ``stats`` (only with ``stats=True`` and an implementation that has forward_with_stats)
    is a dict of copies of its (B, H, S) statistics.
    """
    use_stats = stats and impl.forward_with_stats is not None
    fn = impl.forward_with_stats if use_stats else impl.forward
    return call_impl(fn, {"q": q, "k": k, "v": v}, {"ridge_lambda": ridge_lambda, "qk_scale": qk_scale},
                     out_shape=tuple(v.shape), like=q, with_stats=use_stats, stats_lead=tuple(q.shape[:-1]),
                     poison_memory=poison_memory)


def call_parallax(impl, q, k, v, r, *, qk_scale):
    """``impl``'s Parallax forward, fn(q, k, v, r, *, qk_scale) -> o, across the boundary."""
    o, _ = call_impl(impl.forward, {"q": q, "k": k, "v": v, "r": r}, {"qk_scale": qk_scale},
                     out_shape=tuple(v.shape), like=q)
    return o


def call_decode(impl, args: dict, kwargs: dict, *, stats: bool = False):
    """A decode implementation across the boundary: ``args`` in protocol order (q[, r],
    k_cache, v_cache, lengths), ``kwargs`` its keywords; o of shape (B, H, Dv), stats of
    shape (B, H) when asked and the record has forward_with_stats. Returns (o, stats or None)."""
    q, vc = args["q"], args["v_cache"]
    use_stats = stats and impl.forward_with_stats is not None
    fn = impl.forward_with_stats if use_stats else impl.forward
    return call_impl(fn, args, kwargs, out_shape=(*q.shape[:2], vc.shape[-1]), like=q, with_stats=use_stats,
                     stats_lead=tuple(q.shape[:2]))


def call_impl_grads(fn, args: dict, kwargs: dict, diff: tuple, cot, *, like: torch.Tensor, out_shape: tuple) -> tuple:
    """Gradients of sum <cot, fn(*args.values(), **kwargs)> with respect to the inputs named
    in ``diff``, across the boundary: one entry per name, None (not returned) or the harness's
    copy of a plain tensor of its input's shape, a floating dtype, on the inputs' device."""
    originals = dict(args, **kwargs)
    snapshot = {n: t.detach().clone() for n, t in originals.items() if isinstance(t, torch.Tensor)}
    handed = _hand_over(originals)
    for n in diff:
        handed[n].requires_grad_(True)
    device = like.device
    poison(device, math.prod(out_shape))
    with _Watch(), FreshHeap(device):
        _sync(device)
        with torch.enable_grad():
            o = _guarded(fn, *(handed[n] for n in args), **{n: handed[n] for n in kwargs})
        o = check_tensor(o, "the output o", shape=tuple(out_shape), dtypes=_output_dtypes(like), device=device)
        if not o.requires_grad:
            raise Misbehaved("returned an output that does not require grad (no autograd graph to the inputs)")
        inputs = tuple(handed[n] for n in diff)
        grads = _guarded(torch.autograd.grad, o, inputs, cot.to(o.dtype), allow_unused=True)
        _sync(device)
    _check_inputs(snapshot, originals, {n: t.detach() if isinstance(t, torch.Tensor) else t
                                        for n, t in handed.items()})
    out = []
    floats = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    for name, g, x in zip(diff, grads, inputs):
        if g is None:
            out.append(None)
            continue
        out.append(materialise(check_tensor(g, f"the gradient d{'lambda' if name == 'ridge_lambda' else name}",
                                            shape=tuple(x.shape), dtypes=floats, device=device)))
    return tuple(out)


def call_grads(forward, q, k, v, lam, cot, *, qk_scale) -> tuple:
    """Gradients of sum <cot, forward(q, k, v, lam)> across the boundary: (dq, dk, dv, dlambda).

    ``lam`` is a (B, H, S) tensor; each gradient is None (not returned) or the harness's
    copy of a plain tensor of its input's shape, a floating dtype, on the inputs' device.
    """
    return call_impl_grads(forward, {"q": q, "k": k, "v": v}, {"ridge_lambda": lam, "qk_scale": qk_scale},
                           ("q", "k", "v", "ridge_lambda"), cot, like=q, out_shape=tuple(v.shape))


def call_parallax_grads(forward, q, k, v, r, cot, *, qk_scale) -> tuple:
    """Gradients of sum <cot, forward(q, k, v, r)> across the boundary: (dq, dk, dv, dr)."""
    return call_impl_grads(forward, {"q": q, "k": k, "v": v, "r": r}, {"qk_scale": qk_scale},
                           ("q", "k", "v", "r"), cot, like=q, out_shape=tuple(v.shape))


# ------------------------------------------------------------------ child processes
class ChildFailed(Exception):
    """The worker process ended without answering: the cell failed with this reason."""


def _watchdog():
    while True:
        time.sleep(0.05)
        since, limit = _WATCH["since"], _WATCH["limit"]
        if since is not None and limit is not None and _monotonic() - since > limit:
            _REAL_EXIT(EXIT_TIMEOUT)


def _worker_main(conn, call_limit) -> None:
    # Ctrl-C reaches the whole process group: the parent decides, the child carries on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WATCH["limit"] = call_limit
    threading.Thread(target=_watchdog, daemon=True, name="lla-verify-watchdog").start()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, args, kw = msg
        try:
            res = ("ok", fn(*args, **kw))
        except BaseException as exc:  # noqa: B036  anything the cell raised is reported, not fatal
            res = ("raised", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(res)
        except (BrokenPipeError, ConnectionError, EOFError):  # the parent is gone (its run ended): no one to answer
            return
        except Exception as exc:  # an unpicklable result
            conn.send(("raised", f"the cell's result could not be sent back: {type(exc).__name__}: {exc}"))


def picklable(*objs) -> bool:
    try:
        pickle.dumps(objs)
        return True
    except Exception:
        return False


class Worker:
    """A child process (spawn) that runs ``fn(*args)`` calls one at a time.

    ``call_limit`` bounds each call of the implementation inside the child (its
    watchdog ends the child); ``hard_limit`` bounds a whole call from the parent's side,
    for a hang the watchdog cannot see (one that never releases the GIL). A dead or
    timed-out child is replaced at the next call.
    """

    def __init__(self, call_limit: float | None = DEFAULT_CALL_TIMEOUT, hard_limit: float | None = None):
        self.call_limit = call_limit
        self.hard_limit = hard_limit if hard_limit is not None else (
            None if call_limit is None else 3 * call_limit + 600.0)
        self.proc = None
        self.conn = None

    def _start(self):
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.call_limit), daemon=True,
                                name="lla-verify-worker")
        self.proc.start()
        child.close()
        self.conn = parent

    def _kill(self):
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(5)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def call(self, fn, *args, **kw):
        if self.proc is None or not self.proc.is_alive():
            self._kill()
            self._start()
        try:
            self.conn.send((fn, args, kw))
            t0 = _monotonic()
            while True:
                left = None if self.hard_limit is None else self.hard_limit - (_monotonic() - t0)
                if left is not None and left <= 0:
                    self._kill()
                    raise ChildFailed(f"timed out after {self.hard_limit:g} s (the cell's hard limit)")
                if self.conn.poll(1.0 if left is None else min(left, 1.0)):
                    break
                if not self.proc.is_alive() and not self.conn.poll(0):
                    break
            status, value = self.conn.recv()
        except (EOFError, ConnectionError, OSError, BrokenPipeError):
            self.proc.join(5)
            code = self.proc.exitcode
            self._kill()
            if code == EXIT_TIMEOUT:
                raise ChildFailed(f"timed out after {self.call_limit:g} s") from None
            if code is not None and code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = str(-code)
                raise ChildFailed(f"killed its process by signal {name}") from None
            raise ChildFailed(f"ended its process (exit status {code}) without a result") from None
        except BaseException:
            self._kill()  # the user's Ctrl-C: the child goes with the run
            raise
        if status == "raised":
            raise ChildFailed(f"the cell raised in its worker process: {value}")
        return value

    def restart(self):
        """End the child now; the next call starts a fresh one (a child whose CUDA context
        was lost cannot run another call)."""
        self._kill()

    def close(self):
        if self.conn is not None and self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (OSError, BrokenPipeError):
                pass
        self._kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self._kill()
        except Exception:  # interpreter shutdown: the daemon child goes with us anyway
            pass


def run_isolated(worker: Worker | None, fn, *args, **kw):
    """fn(*args, **kw) in ``worker`` when there is one, else in this process."""
    if worker is None:
        return fn(*args, **kw)
    return worker.call(fn, *args, **kw)


# ------------------------------------------------------------------ timing
def timed_calls(fn, *, device, reps: int) -> tuple[list[float], object]:
    """``fn()`` ``reps`` times, each timed by the harness's clock between device-wide
    synchronisations; returns the times (seconds) and the last call's result.

    ``torch.cuda.synchronize`` waits for every stream of the device, so work an
    implementation launched on a side stream is inside its time; the clock was captured
    at import, so a patched ``time.perf_counter`` does not shorten it. Launch overhead is
    inside too: this is an upper bound on the kernel's time, against the event timing's
    lower one.
    """
    if reps < 1:
        raise ValueError(f"timed_calls: reps must be >= 1, got {reps}")
    times, out = [], None
    for _ in range(reps):
        out = None  # the previous result is freed before the next call, as in a training step
        _sync(device)
        t0 = _perf_counter()
        out = fn()
        _sync(device)
        times.append(_perf_counter() - t0)
    return times, out


# Dense peak rates, the highest a device of the name reaches in any precision the LLA
# kernels use (bf16 tensor cores) and its memory bandwidth: a floor computed from them
# is below any honest time. An unknown device gets rates above every current GPU.
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.04e12),
         "L40S": (362e12, 0.864e12), "A10": (125e12, 0.6e12)}
UNKNOWN_PEAK = (5e15, 20e12)


def device_peaks(name: str) -> tuple[float, float]:
    """(flop/s, byte/s) for a device name as torch.cuda.get_device_name reports it."""
    for key, peaks in PEAKS.items():
        if key.lower() in name.lower():
            return peaks
    return UNKNOWN_PEAK


def lla_forward_floor_s(B: int, H: int, S: int, D: int, elem_bytes: int, peaks: tuple[float, float]) -> float:
    """The least time a causal LLA forward can take on a device with ``peaks``.

    Work counted is a strict part of the forward: the causal scores q k^T and the
    weighted sum over v (2 S (S + 1) D flops per head together; Sigma_i and the solve
    only add), and reading q, k, v and writing o once.
    """
    flops = 2.0 * B * H * S * (S + 1) * D
    bytes_moved = 4.0 * B * H * S * D * elem_bytes
    return roofline_floor_s(flops=flops, bytes_moved=bytes_moved, peak_flops=peaks[0], peak_bytes_s=peaks[1])


def roofline_floor_s(*, flops: float, bytes_moved: float, peak_flops: float, peak_bytes_s: float) -> float:
    """The least time any implementation needs: its work at the device's peak rate."""
    if not (peak_flops > 0 and peak_bytes_s > 0):
        raise ValueError("roofline_floor_s: peak_flops and peak_bytes_s must be > 0")
    return max(flops / peak_flops, bytes_moved / peak_bytes_s)


def implausible_speed(time_s: float, floor_s: float, *, margin: float = 1.0) -> str | None:
    """Why a measured time is faster than the hardware allows, or None when it is not."""
    if not math.isfinite(time_s) or time_s <= 0:
        return f"measured time {time_s!r} s is not a positive number"
    if time_s * margin < floor_s:
        return (f"measured {time_s * 1e3:.4g} ms, below the hardware's floor of {floor_s * 1e3:.4g} ms "
                f"(the work at the device's peak rate): the timing was fooled")
    return None


def timing_disagrees(event_s: float, synced_s: float, *, overhead_s: float = 1e-4) -> str | None:
    """Why an event-timed median far below the synchronised one is not to be believed.

    Events on the timed stream miss work left on other streams; the synchronised time
    misses nothing and exceeds the true time only by launch overhead. An event time
    below half the synchronised one, less ``overhead_s``, is work the events did not see.
    """
    if event_s < 0.5 * synced_s - overhead_s:
        return (f"event-timed {event_s * 1e3:.4g} ms against {synced_s * 1e3:.4g} ms between device-wide "
                "synchronisations: work outside the timed stream")
    return None


__all__ = ["Misbehaved", "ChildFailed", "Worker", "call_impl", "call_forward", "call_grads",
           "call_parallax", "call_parallax_grads", "call_decode", "call_impl_grads", "check_tensor", "clock",
           "materialise", "poison", "user_interrupt", "run_isolated", "picklable", "timed_calls", "device_peaks",
           "lla_forward_floor_s", "roofline_floor_s", "implausible_speed", "timing_disagrees", "DEFAULT_CALL_TIMEOUT"]
