"""Device time of each kernel of one lla_decode or parallax_decode call, from torch.profiler.

bench-decode times whole calls; this says which launch of a call the time goes to (the
Sigma pass, the solve, the output pass, the combine's levels), averaged over a few calls
after warm ones, with SDPA's device time on the same cache (one query) in the same run. bf16, unit Gaussian q, k, v (and the probe r ~ N(0, 1/D)), full caches.

    PYTHONPATH=.:kernels python scripts/profile_decode_kernels.py --op lla --shapes 64:131072:128,1:4096:128

--variant NAME:MODULE.ATTR=VALUE;MODULE.ATTR=VALUE (repeatable) profiles the same calls with
package constants set for the variant (tiles, warps, stages, programs an SM; VALUE a Python
literal) and restored after it, and gives each variant's largest difference from the
package's own output, so that a fast variant that computes something else shows.

    --solver keyed --variant "bn32w8:lla_decode.keyed.KEY_PASS_BLOCK_N=32;lla_decode.keyed.KEY_PASS_WARPS=8"

The kernels' device times leave out the gaps between dependent launches, which is what a
change in the number of launches moves. --graphs adds each variant's step captured in a CUDA
graph through its package's plan (built with the variant set) and timed over replays by
do_bench, beside SDPA's graph, as bench-decode --graphs times them, and a closing table of
graph time / SDPA's graph time by shape and variant. The keyed solve's plan makes its whole
launch schedule (KEYED_MAX_ITERS iteration pairs, most of them empty), so its graph time
counts launches that a plain call, which stops at convergence, does not make.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

SHAPES = "64:131072:128,16:32768:128,1:4096:128,64:131072:64,16:32768:64,1:32768:64"


def kernel_times(fn, calls: int) -> dict[str, float]:
    """ms of device time a call, by kernel name."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            out[ev.key] += ev.device_time_total / calls / 1000.0
    return dict(out)


def parse_variant(text: str) -> tuple[str, list[tuple[str, str, object]]]:
    """'NAME:mod.ATTR=1;mod.ATTR=(2, 3)' -> (NAME, [(mod, ATTR, value), ...])."""
    name, _, body = text.partition(":")
    sets = []
    for item in filter(None, body.split(";")):
        target, _, value = item.partition("=")
        mod, _, attr = target.strip().rpartition(".")
        if not mod or not value:
            raise SystemExit(f"--variant {text!r}: expected MODULE.ATTR=VALUE items")
        sets.append((mod, attr, ast.literal_eval(value.strip())))
    return name, sets


@contextlib.contextmanager
def applied(sets):
    """The package constants of a variant set for the duration, then restored."""
    old = []
    try:
        for mod, attr, value in sets:
            m = importlib.import_module(mod)
            if not hasattr(m, attr):
                raise SystemExit(f"--variant: {mod} has no {attr}")
            old.append((m, attr, getattr(m, attr)))
            setattr(m, attr, value)
        yield
    finally:
        for m, attr, value in reversed(old):
            setattr(m, attr, value)


def graph_ms(fn) -> tuple[float | None, str]:
    """(ms of a replay, "") of ``fn`` captured in a CUDA graph, or (None, why not)."""
    from triton.testing import do_bench

    from lla_verify.commands.bench_decode import GraphUnavailable, graphed

    try:
        replay, _ = graphed(fn)
    except GraphUnavailable as exc:
        return None, str(exc)
    return do_bench(replay), ""


def summary(ratios: dict, names: list[str]) -> str:
    """Markdown table of graph time / SDPA's graph time, rows by shape, columns by variant."""
    lines = ["| B,H,T,D | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for shape, row in ratios.items():
        cells = [f"{row[n]:.2f}x" if row.get(n) is not None else "-" for n in names]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=("lla", "parallax"), default="lla")
    ap.add_argument("--shapes", default=SHAPES, help="B:T:D,... (one head)")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--ridge-lambda", type=float, default=0.1)
    ap.add_argument("--solver", choices=("sigma", "keyed"), default="sigma", help="lla_decode's solver")
    ap.add_argument("--variant", action="append", default=[], help="NAME:MODULE.ATTR=VALUE;... (repeatable)")
    ap.add_argument("--graphs", action="store_true", help="also time each step as a CUDA graph replay (plans)")
    args = ap.parse_args(argv)
    variants = [("package", [])] + [parse_variant(v) for v in args.variant]
    if not torch.cuda.is_available():
        print("profile_decode_kernels: needs a CUDA device")
        return 2
    import lla_decode
    import parallax_decode

    ratios: dict = {}
    solver = f", solver {args.solver}" if args.op == "lla" else ""
    print(f"device: {torch.cuda.get_device_name()}, op {args.op}{solver}, ms of device time a call by kernel")
    for sh in args.shapes.split(","):
        B, T, D = (int(x) for x in sh.split(":"))
        g = torch.Generator(device="cuda").manual_seed(0)
        q, r = (torch.randn(B, 1, D, device="cuda", generator=g) for _ in range(2))
        k, v = (torch.randn(B, 1, T, D, device="cuda", generator=g) for _ in range(2))
        q, k, v, r = (t.to(torch.bfloat16) for t in (q, k, v, r / D ** 0.5))
        lengths = torch.full((B,), T)
        if args.op == "lla":
            fn = lambda: lla_decode.lla_decode(q, k, v, lengths, ridge_lambda=args.ridge_lambda,  # noqa: E731
                                               check_finite=False, solver=args.solver)
        else:
            fn = lambda: parallax_decode.parallax_decode(q, r, k, v, lengths, check_finite=False)  # noqa: E731
        sdpa_fn = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v)  # noqa: E731
        sdpa = kernel_times(sdpa_fn, args.calls)
        shape = f"{B},1,{T},{D}"
        g_sdpa = graph_ms(sdpa_fn)[0] if args.graphs else None
        print(f"{shape} [SDPA]: total {sum(sdpa.values()):.3f} ms"
              + (f", graph {g_sdpa:.4f} ms" if g_sdpa is not None else ""), flush=True)
        ref = None
        for name, sets in variants:
            with applied(sets):
                out = fn()
                times = kernel_times(fn, args.calls)
                if args.graphs:
                    if args.op == "lla":
                        plan = lla_decode.lla_decode_plan(k, v, lengths, ridge_lambda=args.ridge_lambda,
                                                          solver=args.solver)
                        step = lambda: plan.run(q, check_finite=False)  # noqa: E731
                    else:
                        plan = parallax_decode.parallax_decode_plan(k, v, lengths)
                        step = lambda: plan.run(q, r, check_finite=False)  # noqa: E731
                    g_ms, why = graph_ms(step)
                    ratios.setdefault(shape, {})[name] = g_ms / g_sdpa if g_ms is not None and g_sdpa else None
                    print(f"{shape} [{name}] graph " + (f"{g_ms:.4f} ms" if g_ms is not None else why), flush=True)
            ref = out if ref is None else ref
            diff = (out.float() - ref.float()).abs().max().item()
            total = sum(times.values())
            parts = ", ".join(f"{k[:40]} {ms:.3f}" for k, ms in sorted(times.items(), key=lambda x: -x[1]))
            print(f"{shape} [{name}]: total {total:.3f} ms, max |o - package o| {diff:.2e}: {parts}", flush=True)
    if ratios:
        print("\ngraph time / SDPA's graph time\n\n" + summary(ratios, [n for n, _ in variants]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
