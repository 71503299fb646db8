"""Where a Parallax call's time goes: each kernel's device time against the call's do_bench time.

    PYTHONPATH=.:kernels python scripts/profile_parallax.py [--shapes "B,H,S,D;..."] [--step] [--out FILE]

For each shape (bf16, causal; unit Gaussian q, k, v and bench-parallax's 'random' probe), the
forward outside autograd (``--step``: also one forward + backward under autograd) and causal
SDPA on the same q, k, v in the same run: the device time of every kernel a call launches
(torch.profiler, averaged over ``--calls`` calls after warm ones), their sum, and the call's
do_bench median. What the call takes beyond its kernels' device time is host work and the
gaps between launches: at issue 22's small shapes a fit of the forward's times against the
causal pairs puts a fixed cost on each call, and this names it, per launch.

``--smoke`` runs one tiny shape on the CPU (TRITON_INTERPRET=1) with host timers only: it
exercises the script; its numbers are meaningless.
"""

from __future__ import annotations

import argparse
import time

from profile_decode_kernels import kernel_times

from lla_verify.commands.bench_parallax import _probe
from lla_verify.commands.benchkit import BENCH_SHAPES, Table, causal_sdpa, median_ms, randn_inputs, versions_line

SHAPES = BENCH_SHAPES + ((1, 1, 16384, 64),)


def _rows(name: str, per_kernel: dict[str, float], call_ms: float, emit) -> None:
    """One row a kernel (ms a call, share of the call), then the sum and what is left."""
    total = sum(per_kernel.values())
    for kern, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
        emit(f"| {name} | `{kern[:70]}` | {ms:.4f} | {ms / call_ms:.2f} |")
    emit(f"| {name} | **kernels' sum** | {total:.4f} | {total / call_ms:.2f} |")
    emit(f"| {name} | **call (do_bench)** | {call_ms:.4f} | 1.00 |")
    emit(f"| {name} | **host and gaps** | {call_ms - total:.4f} | {(call_ms - total) / call_ms:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=None, help="B,H,S,D;... (default issue 22's four)")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--step", action="store_true", help="also one forward + backward under autograd")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="one tiny shape on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)

    import torch

    import parallax_triton

    device = "cpu" if args.smoke else "cuda"
    shapes = SHAPES
    if args.shapes or args.smoke:
        text = args.shapes or "1,1,40,16"
        shapes = [tuple(int(x) for x in s.split(",")) for s in text.split(";") if s.strip()]
    table = Table()
    emit = table.emit
    emit(versions_line(date=True) if device == "cuda" else "SMOKE RUN on the CPU: every number below is meaningless")
    emit(f"bf16, causal, 'random' probe; kernels' device time averaged over {args.calls} calls (torch.profiler); "
         "the call's time is do_bench's median")
    for B, H, S, D in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = randn_inputs((B, H, S, D), 3, torch.bfloat16, generator=gen, device=device)
        r = _probe((B, H, S, D), torch.bfloat16, gen, device)
        g = randn_inputs((B, H, S, D), 1, torch.bfloat16, generator=gen, device=device)[0]
        leaves = [t.clone().requires_grad_() for t in (q, k, v, r)]

        def fwd():
            with torch.no_grad():
                parallax_triton.parallax_attention(q, k, v, r, check_finite=False)

        def step():
            parallax_triton.parallax_attention(*leaves, check_finite=False).backward(g)

        def sdpa():
            with torch.no_grad():
                causal_sdpa(q, k, v)

        runs = {"parallax fwd": (fwd, None), "sdpa fwd": (sdpa, None)}
        if args.step:
            runs["parallax fwd+bwd"] = (step, leaves)
        emit()
        emit(f"## {B},{H},{S},{D}")
        emit()
        emit("| call | kernel | ms a call | share of the call |")
        emit("|---|---|---|---|")
        for name, (fn, grads) in runs.items():
            if device == "cuda":
                per_kernel = kernel_times(fn, args.calls)
                call_ms = median_ms(fn, grads=grads)
            else:
                t0 = time.perf_counter()
                fn()
                call_ms = (time.perf_counter() - t0) * 1e3
                per_kernel = {}
            _rows(name, per_kernel, call_ms, emit)
        table.write(args.out)
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
