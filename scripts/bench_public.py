"""Our kernel against the public FlashLLA and SDPA, timed in one run on one card.

    PYTHONPATH=.:kernels:PATH_TO_FLASHLLA python scripts/bench_public.py [--out FILE]

For each (B, H, S, D), bf16, causal, lambda 0.1: the median (triton.testing.do_bench)
of the forward and of one fwd+bwd step of lla_triton, of the public kernel at its
defaults, and of causal SDPA (flash backend), interleaved so that clock and thermal
drift hit all three alike. Beside each, the relative L2 error of o (and of dq, dk, dv)
on the first two heads against autograd through the float64 oracle, and the bf16
rounding floor of the same: a speed-up at a worse error is not a speed-up.
Ratios are only printed for timings of this run; nothing is carried over from another.
"""

from __future__ import annotations

import argparse

from lla_verify.cliutil import UsageError
from lla_verify.commands.benchkit import (BENCH_SHAPES, Table, causal_sdpa, median_ms, parse_shapes, randn_inputs,
                                          shapes_text, versions_line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--shapes", default=shapes_text(BENCH_SHAPES),
                    help="B,H,S,D;... (default: the three of docs/performance.md)")
    ap.add_argument("--ridge-lambda", type=float, default=0.1)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
    except UsageError as exc:
        ap.error(str(exc))

    import torch

    import flashlla
    import lla_triton
    from lla_verify.oracles.float64 import lla_forward

    if not torch.cuda.is_available():
        print("bench_public: needs a CUDA device")
        return 2
    lam = args.ridge_lambda
    table = Table()
    emit = table.emit

    def ours(q, k, v):
        return lla_triton.lla_attention(q, k, v, ridge_lambda=lam)

    def public(q, k, v):
        B, H, S, D = q.shape
        o = flashlla.lla_attention(q.reshape(B * H, S, D), k.reshape(B * H, S, D), v.reshape(B * H, S, D),
                                   ridge_lambda=lam)
        return o.reshape(B, H, S, D)

    def rel(x, ref):
        return float((x.double() - ref).norm() / ref.norm())

    emit(versions_line())
    emit(f"bf16, causal, ridge_lambda {lam}; both LLA kernels at their defaults")
    emit()
    emit("| B,H,S,D | fwd ms ours | fwd ms public | fwd ms SDPA | fwd ours/public speed-up | "
         "fwd+bwd ms ours | fwd+bwd ms public | fwd+bwd ms SDPA | fwd+bwd speed-up | "
         "rel err o ours / public (floor) | rel err dq ours / public | dk | dv (floor) |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for B, H, S, D in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, g = randn_inputs((B, H, S, D), 4, torch.bfloat16, generator=gen)
        fns = {"ours": ours, "public": public, "sdpa": causal_sdpa}
        with torch.no_grad():
            t_fwd = {n: median_ms(lambda f=f: f(q, k, v)) for n, f in fns.items()}
        t_step = {}
        outs = {}
        for n, f in fns.items():
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

            def step(f=f, qq=qq, kk=kk, vv=vv):
                f(qq, kk, vv).backward(g)

            t_step[n] = median_ms(step, grads=[qq, kk, vv])
            qq.grad = kk.grad = vv.grad = None
            o = f(qq, kk, vv)
            o.backward(g)
            outs[n] = (o.detach(), qq.grad.detach(), kk.grad.detach(), vv.grad.detach())
        # float64 reference on the first two heads (heads are independent)
        h = min(H, 2) if B == 1 else 1
        sl = (slice(0, 1), slice(0, h))
        q64, k64, v64 = (t[sl].double().requires_grad_(True) for t in (q, k, v))
        o64 = lla_forward(q64, k64, v64, ridge_lambda=lam)
        gq, gk, gv = torch.autograd.grad(o64, (q64, k64, v64), g[sl].double())
        refs = (o64.detach(), gq, gk, gv)
        floor = [rel(r.to(torch.bfloat16), r) for r in refs]
        err = {n: [rel(x[sl], r) for x, r in zip(outs[n], refs)] for n in ("ours", "public")}
        emit(f"| {B},{H},{S},{D} | {t_fwd['ours']:.3f} | {t_fwd['public']:.3f} | {t_fwd['sdpa']:.3f} | "
             f"{t_fwd['public'] / t_fwd['ours']:.2f}x | {t_step['ours']:.3f} | {t_step['public']:.3f} | "
             f"{t_step['sdpa']:.3f} | {t_step['public'] / t_step['ours']:.2f}x | "
             f"{err['ours'][0]:.2e} / {err['public'][0]:.2e} ({floor[0]:.2e}) | "
             f"{err['ours'][1]:.2e} / {err['public'][1]:.2e} | {err['ours'][2]:.2e} / {err['public'][2]:.2e} | "
             f"{err['ours'][3]:.2e} / {err['public'][3]:.2e} ({floor[3]:.2e}) |")
    table.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
