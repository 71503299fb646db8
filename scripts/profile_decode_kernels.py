"""Device time of each kernel of one lla_decode or parallax_decode call, from torch.profiler.

bench-decode times whole calls; this says which launch of a call the time goes to (the
Sigma pass, the solve, the output pass, the combine's levels), averaged over a few calls
after warm ones. bf16, unit Gaussian q, k, v (and the probe r ~ N(0, 1/D)), full caches.

    PYTHONPATH=.:kernels python scripts/profile_decode_kernels.py --op lla --shapes 64:131072:128,1:4096:128
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=("lla", "parallax"), default="lla")
    ap.add_argument("--shapes", default=SHAPES, help="B:T:D,... (one head)")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--ridge-lambda", type=float, default=0.1)
    ap.add_argument("--solver", choices=("sigma", "keyed"), default="sigma", help="lla_decode's solver")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode_kernels: needs a CUDA device")
        return 2
    import lla_decode
    import parallax_decode

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
        times = kernel_times(fn, args.calls)
        total = sum(times.values())
        parts = ", ".join(f"{name[:40]} {ms:.3f}" for name, ms in sorted(times.items(), key=lambda x: -x[1]))
        print(f"{B},1,{T},{D}: total {total:.3f} ms: {parts}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
