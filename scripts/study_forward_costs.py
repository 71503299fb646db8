"""Where the forward's time goes, beside the kernel: the API's own cost, a profile of one
training step, and the accuracy-speed trade of cg_tol (docs/performance.md, seventh run).

    PYTHONPATH=.:kernels python scripts/study_forward_costs.py [--tols 1e-7,1e-6,1e-5,1e-4]

Needs a CUDA device. Times are triton.testing.do_bench medians in one process; errors are
relative L2 against the float64 oracle on the first two heads, beside the bf16 rounding of
the exact output (the floor no bf16 result goes below).
"""

from __future__ import annotations

import argparse
import math

SHAPES = [(16, 1, 2048, 64), (8, 1, 4096, 64), (8, 1, 2048, 128)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tols", default="1e-7,3e-7,1e-6,3e-6,1e-5,1e-4,1e-3")
    ap.add_argument("--ridge-lambda", type=float, default=0.1)
    args = ap.parse_args(argv)

    import torch
    import triton
    from torch.profiler import ProfilerActivity, profile

    import lla_triton
    from lla_triton.forward import lla_forward_kernel
    from lla_verify.oracles.float64 import lla_forward

    if not torch.cuda.is_available():
        raise SystemExit("study_forward_costs: needs a CUDA device")
    lam = args.ridge_lambda

    def bench(fn, **kw):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median", **kw)

    def kernel(q3, k3, v3, lam3, D, tol=lla_triton.DEFAULT_CG_TOL, stats=False):
        return lla_forward_kernel(q3, k3, v3, lam3, 1 / math.sqrt(D), delta_eps=lla_triton.DEFAULT_DELTA_EPS,
                                  cg_tol=tol, cg_max_iters=lla_triton.default_cg_max_iters(D),
                                  preconditioner=None, want_stats=stats)

    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = {s: tuple(torch.randn(*s, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4))
            for s in SHAPES}

    print("\n| B,H,S,D | lla_attention check_finite=True ms | check_finite=False ms | kernel ms | fwd+bwd step ms |")
    print("|---|---|---|---|---|")
    for (B, H, S, D), (q, k, v, g) in data.items():
        q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
        lam3 = torch.full((B * H, S), lam, device="cuda")
        with torch.no_grad():
            t1 = bench(lambda: lla_triton.lla_attention(q, k, v, ridge_lambda=lam))
            t2 = bench(lambda: lla_triton.lla_attention(q, k, v, ridge_lambda=lam, check_finite=False))
        t3 = bench(lambda: kernel(q3, k3, v3, lam3, D))
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        t4 = bench(lambda: lla_triton.lla_attention(qq, kk, vv, ridge_lambda=lam).backward(g), grad_to_none=[qq, kk, vv])
        print(f"| {B},{H},{S},{D} | {t1:.3f} | {t2:.3f} | {t3:.3f} | {t4:.3f} |", flush=True)

    q, k, v, g = data[SHAPES[0]]
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    for _ in range(2):
        lla_triton.lla_attention(qq, kk, vv, ridge_lambda=lam).backward(g)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            lla_triton.lla_attention(qq, kk, vv, ridge_lambda=lam).backward(g)
        torch.cuda.synchronize()
    print(f"\nprofile of three fwd+bwd steps at {SHAPES[0]}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=50))

    print("\n| B,H,S,D | cg_tol | ms | rel L2 err | err / bf16 floor | CG iters mean/max | true residual max |")
    print("|---|---|---|---|---|---|---|")
    for B, H, S, D in (SHAPES[0], SHAPES[2]):
        q, k, v, _ = data[(B, H, S, D)]
        q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
        lam3 = torch.full((B * H, S), lam, device="cuda")
        ref = lla_forward(q3[:2], k3[:2], v3[:2], ridge_lambda=lam)
        floor = ((ref.to(torch.bfloat16).double() - ref).norm() / ref.norm()).item()
        for tol in (float(x) for x in args.tols.split(",")):
            fo = kernel(q3, k3, v3, lam3, D, tol, stats=True)
            err = ((fo.o[:2].double() - ref).norm() / ref.norm()).item()
            it = fo.cg_iters.float()
            t = bench(lambda: kernel(q3, k3, v3, lam3, D, tol))
            print(f"| {B},{H},{S},{D} | {tol:g} | {t:.3f} | {err:.3e} | {err / floor:.2f} | "
                  f"{it.mean().item():.1f}/{int(it.max().item())} | {fo.cg_residual.max().item():.2e} |", flush=True)


if __name__ == "__main__":
    main()
