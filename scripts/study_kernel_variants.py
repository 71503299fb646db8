"""Which lla_triton kernel variants the properties launch that the warm-up does not
(issue 24): on a GPU each is a Triton compile during the tests, in every worker that meets
it before the cache holds it.

    TRITON_INTERPRET=1 PYTHONPATH=.:kernels python scripts/study_kernel_variants.py
        [--dtype float32] [--D 16] [--cases SPEC;SPEC...]

Records every launch through the interpreter as (kernel, its constexpr and launch keyword
arguments, the dtypes of its tensor arguments): what a compile is keyed on, besides the
integer specialisations the kernels switch off (do_not_specialize). First the warm-up's
own calls for (dtype, D) (lla_verify.testing.warmup.run_one for each LLA variant), then
each case the way the properties call the kernel: autograd forward + backward with a
(B, H, S) lambda tensor (check_backward), return_stats=True (check_forward's run),
return_rho=True (the rho reduction). Prints the variants the cases launch that the warm-up
did not, per case, and how many anchor rounds the case's rows took (stats' anchor_rounds).
"""

from __future__ import annotations

import argparse
import os

DEFAULT_CASES = ";".join([
    "gaussian:lam=1,scale_mult=1:B=1,H=1,S=40,D={D},dtype={dt},seed=1",
    "clusters:clusters=2,lam=1e-06,spread=0.01:B=1,H=1,S=40,D={D},dtype={dt},seed=1",
    "offset:lam=1,offset=100:B=1,H=1,S=40,D={D},dtype={dt},seed=1",
])


def recorder():
    import torch
    from triton.runtime import interpreter

    seen = []
    real = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        name = getattr(getattr(self, "fn", None), "__name__", repr(self))
        consts = tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (bool, int, str)) or v is None))
        dts = tuple(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
        seen.append((name, consts, dts))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
    return seen


def call_like_properties(spec: str):
    import torch

    import lla_triton
    from lla_verify.registry.cases import parse_case

    p = parse_case(spec).build("cpu")
    lam = p.lam_tensor.to(torch.float32)
    xs = [t.detach().clone().requires_grad_(True) for t in (p.q, p.k, p.v)]
    lam_g = lam.clone().requires_grad_(True)
    o = lla_triton.lla_attention(*xs, ridge_lambda=lam_g, qk_scale=p.qk_scale)
    o.float().square().sum().backward()
    _, st = lla_triton.lla_attention(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale,
                                     return_stats=True)
    lla_triton.lla_attention(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale, return_rho=True)
    return int(st["anchor_rounds"].max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--D", type=int, default=16)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("study_kernel_variants: set TRITON_INTERPRET=1 (it records the interpreter's launches)")
    seen = recorder()
    from lla_verify.testing import warmup

    for pkg in warmup.LLA_VARIANTS:
        warmup.run_one(pkg, args.dtype, args.D, device="cpu")
    warmed = set(seen)
    print(f"warm-up, {args.dtype} D={args.D}: {len(warmed)} variants")
    for spec in args.cases.split(";"):
        spec = spec.format(D=args.D, dt=args.dtype)
        seen.clear()
        rounds = call_like_properties(spec)
        new = sorted(set(seen) - warmed)
        print(f"{spec}: anchor rounds up to {rounds}; {len(set(seen))} variants, {len(new)} not warmed")
        for name, consts, dts in new:
            keys = ", ".join(f"{k}={v}" for k, v in consts if k in ("FIRST", "SPLIT", "WANT_STATS", "MASK",
                                                                    "num_warps", "num_stages", "BLOCK_M", "BLOCK_N"))
            print(f"    {name}: {keys}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
