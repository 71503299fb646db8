"""Host-side cost of one decode wrapper call (bench-decode's calls: bf16, one head,
lengths on the host, check_finite=False).

A decode call at a small cache takes microseconds of GPU work, so the wrapper's Python and
torch work around its launches (and any call that waits for the device) is what a timer
sees. This runs lla_decode and parallax_decode at the GPU's tiles and splits and reports
per call: the host time (10th percentile), the Python function calls (cProfile: a count
that a shared CPU does not blur), the Triton launches and the torch operators dispatched
(a TorchDispatchMode: each allocation, copy and reduction counts once).

    python scripts/decode_host_time.py [--mode stub|triton|cuda] [--reps 200] [--root CHECKOUT]

--root: time another checkout's kernels (e.g. a `git worktree` of the commit before) for
an A/B in one environment.

--mode stub: a launch is a no-op (the wrapper's own work alone). --mode triton (a Triton
3.x venv, e.g. /work/venv36): a launch runs Triton's JITFunction.run up to the launch
itself (argument binding, specialisation key, cache lookup) through compile_check's
CUDA-target driver; the first call compiles, the timed ones hit the cache. Neither mode
includes the driver's launch call nor CUDA allocator costs: on a GPU, each torch
allocation and host-to-device copy costs more than on the CPU.

--mode cuda (a CUDA device): the real calls, timed on the host while the GPU is kept busy
by a sleep kernel enqueued first, so that no call can wait for its own kernels. What it
reports is the host cost of a call with every launch and allocation; and whether a call
waits for the device at all: the first call after a ~50 ms GPU sleep returns in
microseconds unless something in it synchronises (then it takes the sleep's length).
A do_bench time with an L2 flush is about the larger of the GPU time and this host time
less the flush's own GPU time, so a host cost above the kernels' time is the floor a
benchmark of small shapes sees.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(B, T, D, Hq=1, Hk=1):
    import torch

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    return rnd(B, Hq, D), rnd(B, Hq, D), rnd(B, Hk, T, D), rnd(B, Hk, T, D), torch.full((B,), T, dtype=torch.int64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("stub", "triton", "cuda"), default="stub")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--shapes", default="1,4096,64;16,4096,64;1,32768,64", help="B,T,D;B,T,D;...")
    ap.add_argument("--root", default=ROOT, help="the checkout whose kernels are timed (an A/B against another)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: the wrappers must pick the GPU's tiles and splits")
    sys.path[:0] = [args.root, os.path.join(args.root, "kernels")]
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.jit import JITFunction

    import lla_decode
    import parallax_decode

    for pkg in (lla_decode, parallax_decode):
        pkg._accepts_cpu = lambda: True
    launches = Counter()
    dev = "cuda" if args.mode == "cuda" else "cpu"
    if args.mode == "cuda":
        launch = JITFunction.run

        def run(self, *a, grid, warmup, **kw):
            launches[self.fn.__name__] += 1
            return launch(self, *a, grid=grid, warmup=warmup, **kw)
        JITFunction.run = run
        args.reps = min(args.reps, 100)  # every call's launches queue behind the sleep: stay below the queue's depth
    elif args.mode == "stub":
        def run(self, *a, grid, warmup, **kw):
            launches[self.fn.__name__] += 1
        JITFunction.run = run
    else:
        from lla_verify.testing import compile_check

        compile_check._install(90, [])
        compiled_run = JITFunction.run  # compile_check's: compiles or looks up, never launches

        def run(self, *a, grid, warmup, **kw):
            launches[self.fn.__name__] += 1
            return compiled_run(self, *a, grid=grid, warmup=True, **kw)
        JITFunction.run = run

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    print(f"mode {args.mode}, torch {torch.__version__}, {args.reps} timed calls each; us: 10th percentile of the "
          f"host time a call ({'wall' if dev == 'cuda' else 'thread CPU time, batches of 10 calls'})")
    for spec in args.shapes.split(";"):
        B, T, D = (int(x) for x in spec.split(","))
        q, r, k, v, lens = _inputs(B, T, D)
        q, r, k, v = (t.to(dev) for t in (q, r, k, v))  # lengths stay on the host, as bench-decode passes them
        calls = {"parallax_decode": lambda: parallax_decode.parallax_decode(q, r, k, v, lens, qk_scale=D ** -0.5,
                                                                           check_finite=False),
                 "lla_decode": lambda: lla_decode.lla_decode(q, k, v, lens, ridge_lambda=0.1, qk_scale=D ** -0.5,
                                                             check_finite=False)}
        # the plans (docs/decode.md): the checks and the lengths' copy done once, a run's host
        # work what is left (bench-decode --graphs captures these runs)
        px_plan = parallax_decode.parallax_decode_plan(k, v, lens, qk_scale=D ** -0.5)
        lla_plan = lla_decode.lla_decode_plan(k, v, lens, ridge_lambda=0.1, qk_scale=D ** -0.5)
        calls["parallax_decode plan.run"] = lambda: px_plan.run(q, r, check_finite=False)
        calls["lla_decode plan.run"] = lambda: lla_plan.run(q, check_finite=False)
        for name, fn in calls.items():
            fn()
            fn()
            times, waits = [], ""
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda._sleep(100_000_000)  # ~50 ms at 2 GHz
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
            else:
                # the thread's CPU time over batches of 10 calls: on a shared CPU, wall time
                # counts the other processes' turns too
                for _ in range(max(1, args.reps // 10)):
                    t0 = time.thread_time()
                    for _ in range(10):
                        fn()
                    times.append((time.thread_time() - t0) / 10)
            if dev == "cuda":
                torch.cuda.synchronize()
                from triton.testing import do_bench

                # bench-decode's timer (CUDA events, L2 flushed between calls)
                waits = (f"first call behind a GPU sleep {times[0] * 1e6:.0f} us, "
                         f"do_bench {do_bench(fn) * 1e3:.1f} us, ")
            launches.clear()
            with Ops() as mode:
                fn()
            n_launches = sum(launches.values())
            ops = sorted(mode.ops.items(), key=lambda kv: -kv[1])
            # Python function calls a call makes (deterministic, unlike a time on a shared CPU)
            prof = cProfile.Profile()
            prof.runcall(fn)
            n_calls = pstats.Stats(prof).total_calls
            times.sort()
            p10 = times[len(times) // 10]
            print(f"B={B} T={T} D={D} {name}: {p10 * 1e6:.1f} us (median {statistics.median(times) * 1e6:.1f}), {waits}"
                  f"{n_calls} Python calls, {n_launches} launches, {sum(mode.ops.values())} torch ops: "
                  + ", ".join(f"{k} {n}" for k, n in ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
